"""Triton backend: ``@triton.jit`` kernels for every BLIP op.

Runs on CUDA tensors, and on CPU tensors under Triton's interpreter when
``TRITON_INTERPRET=1`` is set before this backend's kernels are first imported
(they are imported on the first op call, so setting it before importing
blip_kernels is always early enough).
``import blip_kernels`` never imports triton: the kernel modules load on first use.
Contract: see :mod:`blip_kernels.reference`.
"""

from __future__ import annotations

import importlib
import os
import sys
from types import ModuleType

import torch
from torch import Tensor

NAME = "triton"


def _interpret_mode() -> bool:
    """Whether CPU tensors can run: the kernels are decorated for the interpreter iff
    TRITON_INTERPRET=1 when they are first imported (triton reads it at decoration).
    Once imported their mode is fixed, whatever the variable says later."""
    common = sys.modules.get(f"{__name__}._common")
    if common is not None:
        return bool(common.INTERPRET)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _module(name: str) -> ModuleType:
    return importlib.import_module(f"{__name__}.{name}")


def unavailable_reason(device: torch.device) -> str | None:
    try:
        import triton  # noqa: F401 - only probing that it imports
    except ImportError as exc:
        return f"import triton failed: {exc}"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "torch.cuda.is_available() is False"
        return None
    if device.type == "cpu":
        if _interpret_mode():
            return None
        return (
            "Triton runs on CPU tensors only under TRITON_INTERPRET=1 "
            "(set it before importing blip_kernels)"
        )
    return f"Triton does not run on {device.type} tensors"


def quantize(w: Tensor, bits: Tensor, bound: float) -> Tensor:
    return _module("quant").quantize(w, bits, bound)


def project_(w: Tensor, prev: Tensor, bits: Tensor, bound: float, max_bit: int) -> Tensor:
    return _module("step").project_(w, prev, bits, bound, max_bit)


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
    return _module("step").sgd_step_(
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
    # A launch per tensor: asynchronous on CUDA, so the loop costs Python time only.
    step = _module("step")
    counts = [
        step.sgd_step_(w, grads[i], prevs[i], bits[i],
                       None if momentum_bufs is None else momentum_bufs[i], bounds[i], max_bit,
                       lr, momentum, dampenings[i], nesterov, weight_decay)
        for i, w in enumerate(ws)
    ]
    if not counts:
        return torch.zeros((), dtype=torch.int64)
    return torch.stack(counts).sum()


def update_bits_(bits: Tensor, fisher: Tensor, fisher_old: Tensor, task: int, max_bit: int) -> None:
    _module("bits").update_bits_(bits, fisher, fisher_old, task, max_bit)


def sync_(w: Tensor, prev: Tensor, bits: Tensor, bound: float) -> None:
    _module("step").sync_(w, prev, bits, bound)


def fisher_linear_(
    fisher_w: Tensor, fisher_b: Tensor | None, x: Tensor, grad_out: Tensor, scale: float
) -> None:
    _module("fisher").fisher_linear_(fisher_w, fisher_b, x, grad_out, scale)


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
    _module("fisher").fisher_conv2d_(
        fisher_w, fisher_b, x, grad_out, stride, padding, dilation, groups, scale
    )
