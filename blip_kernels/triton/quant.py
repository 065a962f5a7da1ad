"""Section 1: quantize (bit-exact with reference.quantize).

Named quant.py, not quantize.py: importing a submodule named `quantize` would
rebind the package attribute `blip_kernels.triton.quantize` (the contract function).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import (
    ELEMWISE_BLOCK,
    f32,
    from_f32,
    kind_of,
    launch_opts,
    load_f32,
    quantize_f32,
    storage,
)


@triton.jit
def _quantize_kernel(w_ptr, bits_ptr, out_ptr, n, b, KIND: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    w = load_f32(w_ptr, offs, mask, KIND)
    bits = tl.load(bits_ptr + offs, mask=mask, other=0).to(tl.int32)
    q = quantize_f32(w, bits, b)
    tl.store(out_ptr + offs, from_f32(q, KIND), mask=mask)


def quantize(w: Tensor, bits: Tensor, bound: float) -> Tensor:
    out = torch.empty_like(w)
    n = w.numel()
    if n:
        grid = (triton.cdiv(n, ELEMWISE_BLOCK),)
        _quantize_kernel[grid](
            storage(w), bits, storage(out), n, f32(bound), KIND=kind_of(w),
            BLOCK=ELEMWISE_BLOCK, **launch_opts(),
        )
    return out
