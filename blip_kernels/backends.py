"""Backend registry: which implementation runs an op for a given device.

Choice order, highest first: the innermost :func:`use_backend` context, the
``BLIP_KERNELS_BACKEND`` environment variable (read when blip_kernels is imported),
then automatic choice
(CUDA: triton, else cpp, else reference; CPU: cpp, else reference). A backend
named explicitly that cannot run is an error that says why; automatic choice
never fails because ``reference`` runs everywhere.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import threading
from collections.abc import Iterator
from types import ModuleType

import torch

NAMES = ("reference", "cpp", "triton")
_ALIASES = {"torch": "reference", "ref": "reference", "c++": "cpp", "native": "cpp"}
_AUTO_ORDER = {"cuda": ("triton", "cpp", "reference"), "cpu": ("cpp", "reference")}

class _Local(threading.local):
    # Created per thread on first use, so reading .stack never raises (getattr with a
    # default on a missing attribute raises and catches an AttributeError per op call).
    def __init__(self) -> None:
        self.stack: list[str] = []


_local = _Local()


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run on this machine or device."""


def canonical_name(name: str) -> str:
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
    return [n for n in NAMES if unavailable_reason(n, device) is None]


def _env_backend() -> str | None:
    env = os.environ.get("BLIP_KERNELS_BACKEND", "").strip()
    return canonical_name(env) if env else None


# Read once at import, like TRITON_INTERPRET: every op call consults the choice, and an
# environment lookup per call is a measurable share of a small training step.
_ENV_BACKEND = _env_backend()


def _requested() -> str | None:
    stack = _local.stack
    return stack[-1] if stack else _ENV_BACKEND


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the ops in this block (this thread) with backend ``name``."""
    stack = _local.stack
    stack.append(canonical_name(name))
    try:
        yield
    finally:
        stack.pop()


_cache: dict[tuple[str, str], ModuleType] = {}


def resolve(device: torch.device) -> ModuleType:
    """The backend module that will run ops on ``device`` right now."""
    requested = _requested()
    key = (requested or "auto", device.type)
    module = _cache.get(key)
    if module is not None:
        return module
    if requested is not None:
        reason = unavailable_reason(requested, device)
        if reason is not None:
            raise BackendUnavailableError(
                f"blip_kernels backend {requested!r} cannot run on {device.type}: {reason}"
            )
        module = _load(requested)
    else:
        order = _AUTO_ORDER.get(device.type, ("reference",))
        name = next(n for n in order if unavailable_reason(n, device) is None)
        module = _load(name)
    _cache[key] = module
    return module


def current_backend(device: torch.device | str = "cpu") -> str:
    """Name of the backend that ops on ``device`` would use now."""
    return resolve(torch.device(device)).NAME
