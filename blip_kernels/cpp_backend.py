"""The ``cpp`` backend: the native extension ``blip_kernels._C``.

CPU tensors run the OpenMP kernels of ``csrc/cpu``; CUDA tensors the kernels of
``csrc/cuda`` when the extension was built against a CUDA torch. The functions
follow the backend contract of :mod:`blip_kernels.reference` (contiguous,
validated inputs; in-place on their first arguments) and forward to ``_C`` as is.
``_C`` re-checks every argument itself (csrc/ops.cpp) and tells autograd about its
writes (version counters), so this backend needs no Python-side write tracking.
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import Tensor

NAME = "cpp"
#: _C bumps the version counter of every tensor it writes (see ops._announce_writes).
TRACKS_WRITES = True

_C: ModuleType | None
_import_error: str | None
try:
    from . import _C  # type: ignore[attr-defined, no-redef]

    _import_error = None
except (ImportError, OSError) as exc:  # not built (BLIP_NO_EXT=1), or it does not load
    _C = None
    _import_error = f"{type(exc).__name__}: {exc}"


def unavailable_reason(device: torch.device) -> str | None:
    if _C is None:
        return (
            "the native extension blip_kernels._C was not built or does not load "
            f"(BLIP_NO_EXT=1, or the build failed: {_import_error})"
        )
    if device.type == "cuda":
        if not _C.has_cuda():
            return "blip_kernels._C was built without CUDA"
        if not torch.cuda.is_available():
            return "torch.cuda.is_available() is False"
        return None
    if device.type != "cpu":
        return f"blip_kernels._C has no kernels for {device.type} tensors"
    return None


def _ext() -> ModuleType:
    if _C is None:  # only reachable when called without going through the registry
        raise RuntimeError(unavailable_reason(torch.device("cpu")))
    return _C


def quantize(w: Tensor, bits: Tensor, bound: float) -> Tensor:
    return _ext().quantize(w, bits, bound)


def project_(w: Tensor, prev: Tensor, bits: Tensor, bound: float, max_bit: int) -> Tensor:
    return _ext().project_(w, prev, bits, bound, max_bit)


def sgd_step_(
    w: Tensor,
    grad: Tensor,
    prev: Tensor,
    bits: Tensor,
    momentum_buf: Tensor | None,
    bound: float,
    max_bit: int,
    lr: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    weight_decay: float,
) -> Tensor:
    return _ext().sgd_step_(
        w, grad, prev, bits, momentum_buf, bound, max_bit, lr, momentum, dampening, nesterov,
        weight_decay,
    )


def sgd_step_foreach_(
    ws: list[Tensor],
    grads: list[Tensor],
    prevs: list[Tensor],
    bits: list[Tensor],
    momentum_bufs: list[Tensor] | None,
    bounds: list[float],
    max_bit: int,
    lr: float,
    momentum: float,
    dampenings: list[float],
    nesterov: bool,
    weight_decay: float,
) -> Tensor:
    # One native call (GIL released) for the whole list.
    return _ext().sgd_step_foreach_(
        ws, grads, prevs, bits, momentum_bufs, bounds, max_bit, lr, momentum, dampenings,
        nesterov, weight_decay,
    )


def update_bits_(bits: Tensor, fisher: Tensor, fisher_old: Tensor, task: int, max_bit: int) -> None:
    _ext().update_bits_(bits, fisher, fisher_old, task, max_bit)


def sync_(w: Tensor, prev: Tensor, bits: Tensor, bound: float) -> None:
    _ext().sync_(w, prev, bits, bound)


def fisher_linear_(
    fisher_w: Tensor, fisher_b: Tensor | None, x: Tensor, grad_out: Tensor, scale: float
) -> None:
    _ext().fisher_linear_(fisher_w, fisher_b, x, grad_out, scale)


def fisher_conv2d_(
    fisher_w: Tensor,
    fisher_b: Tensor | None,
    x: Tensor,
    grad_out: Tensor,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    groups: int,
    scale: float,
) -> None:
    _ext().fisher_conv2d_(
        fisher_w, fisher_b, x, grad_out, list(stride), list(padding), list(dilation), groups,
        scale,
    )
