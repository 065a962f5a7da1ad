"""Every private Triton API the ahead-of-time check uses, in one place.

Compiling a kernel for a GPU that is not there needs Triton's own argument
specialisation (so a recorded launch compiles exactly as it would at run time)
and the ptxas log (register and spill counts are otherwise only known once a
driver loads the binary). Both are internals: they were written against
``TESTED_TRITON`` and fail with :class:`TritonInternalsChanged`, which says so,
when a later Triton moves them.
"""

from __future__ import annotations

import contextlib
import io
import re
import tempfile
from dataclasses import dataclass
from typing import Any

import triton
import triton.language as tl

from . import _compat

TESTED_TRITON = tuple(f"{major}.{minor}" for major, minor in _compat.TESTED)


class TritonInternalsChanged(RuntimeError):
    """The private Triton API this check relies on is not where it was."""


def _internals_changed(what: str, exc: BaseException) -> TritonInternalsChanged:
    return TritonInternalsChanged(
        f"triton {triton.__version__}: {what} failed ({type(exc).__name__}: {exc}). "
        f"blip_kernels/triton/_aot.py was written against triton {', '.join(TESTED_TRITON)}.x; "
        "update it for this version's internals (runtime/jit.py specialisation, "
        "knobs.nvidia.dump_ptxas_log)."
    )


try:
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction, create_function_from_signature
except ImportError as _exc:  # pragma: no cover - only on a different triton
    raise _internals_changed("importing the compiler internals", _exc) from _exc


def version_note() -> str | None:
    """A warning line when this triton is not one the check was written for."""
    if _compat.VERSION in _compat.TESTED:
        return None
    return (f"warning: triton {triton.__version__} is untested here "
            f"(tested: {', '.join(TESTED_TRITON)}.x); results may be wrong")


def unwrap(kernel: Any) -> tuple[JITFunction, list[dict[str, Any]] | None]:
    """The jitted function behind a launcher's kernel object, and the launch
    options of each autotune config (None for a plain ``@triton.jit`` kernel)."""
    if isinstance(kernel, Autotuner):
        return kernel.fn, [dict(c.all_kwargs()) for c in kernel.configs]
    if isinstance(kernel, JITFunction):
        return kernel, None
    raise TypeError(f"not a triton kernel: {kernel!r}")


@dataclass(frozen=True)
class Specialisation:
    """What one launch compiles to: Triton's own cache key and its compile inputs."""

    key: str
    fn: JITFunction
    signature: dict[str, str]
    constexprs: dict[Any, Any]
    attrs: dict[Any, Any]
    options: dict[str, Any]


def specialise(fn: JITFunction, args: tuple, kwargs: dict[str, Any], arch: int) -> Specialisation:
    """Bind a launch's arguments as ``JITFunction.run`` does (divisibility, ==1 ints,
    pointer alignment), for ``sm_<arch>`` instead of the current device."""
    target = GPUTarget("cuda", arch, 32)
    try:
        backend = make_backend(target)
        binder = create_function_from_signature(fn.signature, fn.params, backend)
        bound, spec, opts = binder(*args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(backend, dict(kwargs), bound, spec,
                                                              opts)
    except (AttributeError, TypeError, ValueError) as exc:
        raise _internals_changed("binding a launch's arguments", exc) from exc
    key = f"{fn.__name__}|{spec}|{sorted(opts.items())}"
    return Specialisation(key, fn, signature, constexprs, attrs, dict(options.__dict__))


@dataclass
class CompileResult:
    ok: bool
    error: str | None = None
    registers: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    stack_bytes: int | None = None
    shared_bytes: int | None = None


_REGS = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def parse_ptxas_log(log: str) -> tuple[int, int, int, int]:
    """(registers, stack frame, spill stores, spill loads) from ``ptxas -v`` output."""
    regs, spills = _REGS.search(log), _SPILLS.search(log)
    if regs is None or spills is None:
        raise TritonInternalsChanged(f"no register/spill counts in the ptxas log:\n{log}")
    stack, stores, loads = (int(v) for v in spills.groups())
    return int(regs.group(1)), stack, stores, loads


def compile_for(spec: Specialisation, arch: int) -> CompileResult:
    """Compile for ``sm_<arch>`` with a fresh cache (so ptxas really runs and its log,
    which Triton prints when asked, is captured). No GPU needed."""
    target = GPUTarget("cuda", arch, 32)
    log = io.StringIO()
    with tempfile.TemporaryDirectory(prefix="blip-aot-") as cache:
        saved = (knobs.cache.dir, knobs.nvidia.dump_ptxas_log)
        try:
            knobs.cache.dir = cache
            knobs.nvidia.dump_ptxas_log = True
            src = ASTSource(spec.fn, spec.signature, spec.constexprs, spec.attrs)
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                compiled = triton.compile(src, target=target, options=spec.options)
        except TritonInternalsChanged:
            raise
        except Exception as exc:  # noqa: BLE001 - a compile error is a result, not a crash
            text = f"{type(exc).__name__}: {exc}".strip()
            tail = [ln for ln in log.getvalue().splitlines() if "Assertion" in ln or "error" in ln]
            return CompileResult(ok=False, error=" | ".join([text.splitlines()[0], *tail[:2]]))
        finally:
            knobs.cache.dir, knobs.nvidia.dump_ptxas_log = saved
    regs, stack, stores, loads = parse_ptxas_log(log.getvalue())
    return CompileResult(ok=True, registers=regs, spill_stores=stores, spill_loads=loads,
                         stack_bytes=stack, shared_bytes=int(compiled.metadata.shared))


@triton.jit
def _warm_up_kernel(out_ptr):
    tl.store(out_ptr, 1.0)


def warm_up(arch: int) -> None:
    """Compile a trivial kernel once in the parent, so the forked compiles inherit
    Triton's one-off set-up (backend discovery, the ptxas version probe)."""
    spec = Specialisation("warm-up", _warm_up_kernel, {"out_ptr": "*fp32"}, {}, {},
                          {"num_warps": 1})
    result = compile_for(spec, arch)
    if not result.ok:
        raise TritonInternalsChanged(f"a one-line kernel does not compile: {result.error}")
