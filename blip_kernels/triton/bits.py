"""Sections 2 and 3: bit growth, running Fisher fold and F = 0 in one pass."""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from ..reference import GAIN_SCALE
from ._common import ELEMWISE_BLOCK, INTERPRET, f32, launch_opts

if not INTERPRET:
    from triton.language.extra import libdevice
else:  # the interpreter has no libdevice; tl.log is numpy's log there
    libdevice = None


@triton.jit
def _update_bits_kernel(
    bits_ptr, f_ptr, fo_ptr, n, t1, t2, c,
    MAX_BIT: tl.constexpr, USE_LIBDEVICE: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    f = tl.load(f_ptr + offs, mask=mask, other=0.0)
    fo = tl.load(fo_ptr + offs, mask=mask, other=1.0)
    bits = tl.load(bits_ptr + offs, mask=mask, other=0).to(tl.int32)
    ratio = tl.div_rn(f + fo * t1, fo * t2)
    if USE_LIBDEVICE:  # noqa: SIM108 - constexpr branch, the other side is never compiled
        # __nv_logf is what torch's CUDA log calls: same fp32 value as the reference on GPU.
        lg = libdevice.log(ratio)
    else:
        lg = tl.log(ratio)
    grow = tl.ceil(c * lg)
    # NaN (0/0) compares false -> 0; +inf is capped before the integer cast.
    grow = tl.where(grow > 0.0, grow, 0.0)
    grow = tl.minimum(grow, MAX_BIT * 1.0)
    new_bits = tl.minimum(bits + grow.to(tl.int32), MAX_BIT)
    tl.store(bits_ptr + offs, new_bits.to(tl.uint8), mask=mask)
    tl.store(fo_ptr + offs, tl.div_rn(fo * t1 + f, t2), mask=mask)
    tl.store(f_ptr + offs, tl.zeros_like(f), mask=mask)


def update_bits_(bits: Tensor, fisher: Tensor, fisher_old: Tensor, task: int, max_bit: int) -> None:
    n = bits.numel()
    if not n:
        return
    _update_bits_kernel[(triton.cdiv(n, ELEMWISE_BLOCK),)](
        bits, fisher, fisher_old, n, f32(task + 1.0), f32(task + 2.0), f32(GAIN_SCALE),
        MAX_BIT=max_bit, USE_LIBDEVICE=not INTERPRET, BLOCK=ELEMWISE_BLOCK, **launch_opts(),
    )
