"""Backend registry: which implementation runs an op for a given device.

Choice order, highest first: the innermost :func:`use_backend` block of the current
context (thread or asyncio task), the ``BLIP_KERNELS_BACKEND`` environment variable
(read when blip_kernels is imported), then automatic choice (CUDA: triton, else cpp,
else reference; CPU: cpp, else reference). A backend named explicitly that cannot run
is an error that says why; automatic choice only fails for a device torch itself cannot
use (``cuda`` without a GPU). :func:`current_backend` names the backend a device gets.

Meta tensors carry no data, so every backend's answer on them is the same shape
propagation: they always run the reference (pure torch) code.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import os
import warnings
from collections.abc import Iterator
from types import ModuleType

import torch

NAMES = ("reference", "cpp", "triton")
_ALIASES = {"torch": "reference", "ref": "reference", "c++": "cpp", "native": "cpp"}
_AUTO_ORDER = {"cuda": ("triton", "cpp", "reference"), "cpu": ("cpp", "reference")}

# The use_backend override of the current context: a contextvar, so threads (which
# start with an empty context) and asyncio tasks (which copy it) never see each
# other's blocks. None: no override in this context.
_override: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "blip_kernels_backend", default=None
)


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run on this machine or device."""


class BackendFallbackWarning(UserWarning):
    """Automatic choice fell back to a slower backend (the native extension is missing)."""


def canonical_name(name: str) -> str:
    if not isinstance(name, str):
        raise TypeError(
            f"backend name must be a str, one of {NAMES} (or 'torch'); got {name!r}"
        )
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in NAMES:
        raise ValueError(
            f"unknown blip_kernels backend {name!r}; choose one of {NAMES} (or 'torch')"
        )
    return key


def _load(name: str) -> ModuleType:
    module = {
        "reference": "blip_kernels.reference",
        "cpp": "blip_kernels.cpp_backend",
        "triton": "blip_kernels.triton",
    }[name]
    return importlib.import_module(module)


def unavailable_reason(name: str, device: torch.device | str = "cpu") -> str | None:
    """None if backend ``name`` can run on ``device``, else the reason it cannot."""
    name = canonical_name(name)
    device = torch.device(device)
    try:
        module = _load(name)
    except ImportError as exc:  # an optional dependency is missing
        return f"importing it failed: {exc}"
    return module.unavailable_reason(device)


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """The backends that can run on ``device`` here (``cuda`` needs a usable GPU)."""
    return [n for n in NAMES if unavailable_reason(n, device) is None]


def _env_backend() -> str | None:
    env = os.environ.get("BLIP_KERNELS_BACKEND", "").strip()
    return canonical_name(env) if env else None


# Read once at import, like TRITON_INTERPRET: every op call consults the choice, and an
# environment lookup per call is a measurable share of a small training step.
_ENV_BACKEND = _env_backend()


def _requested() -> str | None:
    name = _override.get()
    return _ENV_BACKEND if name is None else name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the ops in this block with backend ``name``.

    The choice belongs to the current context: other threads and other asyncio
    tasks keep their own (a new thread starts with none).
    """
    token = _override.set(canonical_name(name))
    try:
        yield
    finally:
        _override.reset(token)


_cache: dict[tuple[str, str], ModuleType] = {}
_warned_fallback = False


def _warn_fallback_once(device: torch.device, chosen: str) -> None:
    """Say once per process that automatic choice could not use the native extension.

    A warning, not a log record: it is about the install (fixable by the user), shows
    without any logging setup, and can be filtered by its category.
    """
    global _warned_fallback
    if _warned_fallback or device.type not in ("cpu", "cuda") or chosen == "cpp":
        return
    reason = _load("cpp").unavailable_reason(torch.device("cpu"))
    if reason is None or "not built" not in reason:
        return  # _C loaded; it is only unusable for this device (e.g. built without CUDA)
    _warned_fallback = True
    warnings.warn(
        f"blip_kernels: using the {chosen!r} backend on {device.type} because {reason}. "
        "To fix it, rebuild in the source tree with `pip install --no-build-isolation -e .` "
        "(needs a C++ compiler; see the README); to silence it, set "
        f"BLIP_KERNELS_BACKEND={chosen}.",
        BackendFallbackWarning,
        stacklevel=4,
    )


def resolve(device: torch.device) -> ModuleType:
    """The backend module that will run ops on ``device`` right now."""
    requested = _requested()
    key = (requested or "auto", device.type)
    module = _cache.get(key)
    if module is not None:
        return module
    if device.type == "meta":
        module = _load("reference")  # no data: shape propagation, the same on every backend
    elif requested is not None:
        reason = unavailable_reason(requested, device)
        if reason is not None:
            raise BackendUnavailableError(
                f"blip_kernels backend {requested!r} cannot run on {device.type}: {reason}"
            )
        module = _load(requested)
    else:
        order = _AUTO_ORDER.get(device.type, ("reference",))
        reasons = {n: unavailable_reason(n, device) for n in order}
        name = next((n for n in order if reasons[n] is None), None)
        if name is None:
            why = "; ".join(f"{n}: {r}" for n, r in reasons.items())
            raise BackendUnavailableError(f"no blip_kernels backend can run on {device}: {why}")
        _warn_fallback_once(device, name)
        module = _load(name)
    _cache[key] = module
    return module


def current_backend(device: torch.device | str = "cpu") -> str:
    """Name of the backend that ops on ``device`` use now (override or automatic choice).

    This is what a run should record (e.g. in its results.json) as the backend it used.
    """
    if not isinstance(device, (torch.device, str)):
        raise TypeError(f"device must be a torch.device or a str; got {device!r}")
    return resolve(torch.device(device)).NAME
