"""Section 4 and 5: fused SGD step + projection, projection alone, sync.

Each kernel makes one pass over memory; all must be bit-exact with reference.py,
so the fp32 operation order below mirrors it line by line. Fused multiply-adds are
explicit (``_fma``) exactly where torch.optim.SGD's kernels fuse (see csrc/blip_math.h);
``launch_opts`` turns implicit contraction off everywhere else.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import (
    ELEMWISE_BLOCK,
    INTERPRET,
    counter,
    f32,
    from_f32,
    is_finite,
    kind_of,
    launch_opts,
    load_f32,
    project_f32,
    quantize_f32,
    storage,
    to_f32,
)


def _limits(bound: float, max_bit: int) -> tuple[float, float]:
    """fp32 bound and clamp limit, computed exactly as reference._project_f32 does."""
    b = torch.tensor(bound, dtype=torch.float32)
    lim = b * torch.tensor(1.0 - 2.0**-max_bit, dtype=torch.float32)
    return float(b.item()), float(lim.item())


#: The interpreter's tl.fma is numpy's a*b + c (two roundings): emulate it there.
_EMULATE_FMA = tl.constexpr(INTERPRET)


@triton.jit
def _fma(a, b, c):
    """fp32 a*b + c rounded once: tl.fma when compiled. Emulated in fp64 under the
    interpreter: the product is exact, TwoSum recovers the sum's rounding error
    exactly, and folding it in by rounding to odd makes the final fp32 rounding
    correct (53 >= 2*24 + 2 bits)."""
    if _EMULATE_FMA:
        # tl.cast, not .to: a scalar argument is a plain Python float in the interpreter
        p = tl.cast(a, tl.float64) * tl.cast(b, tl.float64)
        c64 = tl.cast(c, tl.float64)
        s = p + c64
        sp = s - p
        err = (p - (s - sp)) + (c64 - sp)
        u = s.to(tl.int64, bitcast=True)
        # inexact and even: step to the odd neighbour on err's side (sign-magnitude bits)
        fix = (err != 0.0) & ((u & 1) == 0) & (tl.abs(s) <= 1.7976931348623157e308)
        u = tl.where(fix, tl.where((err > 0.0) == (s > 0.0), u + 1, u - 1), u)
        return u.to(tl.float64, bitcast=True).to(tl.float32)
    else:
        return tl.fma(a, b, c)


@triton.jit
def _sgd_project_kernel(
    w_ptr, g_ptr, prev_ptr, bits_ptr, buf_ptr, count_ptr, n,
    b, lim, lr, momentum, damp1, wd,
    KIND: tl.constexpr, HAS_WD: tl.constexpr, HAS_MOMENTUM: tl.constexpr,
    NESTEROV: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    w = load_f32(w_ptr, offs, mask, KIND)
    g = load_f32(g_ptr, offs, mask, KIND)
    prev = tl.load(prev_ptr + offs, mask=mask, other=0.0)
    bits = tl.load(bits_ptr + offs, mask=mask, other=0).to(tl.int32)
    ok = is_finite(g)
    g = tl.where(ok, g, 0.0)
    if HAS_WD:
        g = _fma(w, wd, g)
    if HAS_MOMENTUM:
        buf_old = tl.load(buf_ptr + offs, mask=mask, other=0.0)
        buf = _fma(g, damp1, buf_old * momentum)
        tl.store(buf_ptr + offs, tl.where(ok, buf, buf_old), mask=mask)
        if NESTEROV:  # noqa: SIM108 - constexpr branch
            g = _fma(buf, momentum, g)
        else:
            g = buf
    stepped = tl.where(ok, _fma(g, -lr, w), w)
    out = project_f32(stepped, prev, bits, b, lim)
    tl.store(w_ptr + offs, from_f32(out, KIND), mask=mask)
    # One atomic per block, not per element, and none where the block had no bad
    # gradient (the usual case): same-address atomics from every block serialise.
    bad = tl.sum((mask & ~ok).to(tl.int64), axis=0)
    if bad > 0:
        tl.atomic_add(count_ptr, bad)


@triton.jit
def _project_kernel(
    w_ptr, prev_ptr, bits_ptr, count_ptr, n, b, lim, KIND: tl.constexpr, BLOCK: tl.constexpr
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    w = load_f32(w_ptr, offs, mask, KIND)
    prev = tl.load(prev_ptr + offs, mask=mask, other=0.0)
    bits = tl.load(bits_ptr + offs, mask=mask, other=0).to(tl.int32)
    out = project_f32(w, prev, bits, b, lim)
    tl.store(w_ptr + offs, from_f32(out, KIND), mask=mask)
    bad = tl.sum((mask & ~is_finite(w)).to(tl.int64), axis=0)
    if bad > 0:
        tl.atomic_add(count_ptr, bad)


@triton.jit
def _sync_kernel(w_ptr, prev_ptr, bits_ptr, n, b, KIND: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    w = load_f32(w_ptr, offs, mask, KIND)
    bits = tl.load(bits_ptr + offs, mask=mask, other=0).to(tl.int32)
    q = from_f32(quantize_f32(w, bits, b), KIND)
    tl.store(w_ptr + offs, q, mask=mask)
    # prev holds the weight as stored, i.e. after rounding to the parameter dtype.
    tl.store(prev_ptr + offs, to_f32(q, KIND), mask=mask)


def _grid(n: int) -> tuple[int]:
    return (triton.cdiv(n, ELEMWISE_BLOCK),)


def project_(w: Tensor, prev: Tensor, bits: Tensor, bound: float, max_bit: int) -> Tensor:
    count = counter(w.device)
    n = w.numel()
    if n:
        b, lim = _limits(bound, max_bit)
        _project_kernel[_grid(n)](
            storage(w), prev, bits, count, n, b, lim, KIND=kind_of(w), BLOCK=ELEMWISE_BLOCK,
            **launch_opts(),
        )
    return count


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
    count = counter(w.device)
    n = w.numel()
    if not n:
        return count
    has_momentum = momentum_buf is not None and momentum != 0
    b, lim = _limits(bound, max_bit)
    _sgd_project_kernel[_grid(n)](
        storage(w), storage(grad), prev, bits, momentum_buf if has_momentum else prev, count, n,
        b, lim, f32(lr), f32(momentum), f32(1.0 - dampening), f32(weight_decay),
        KIND=kind_of(w), HAS_WD=weight_decay != 0, HAS_MOMENTUM=has_momentum,
        NESTEROV=bool(nesterov) and has_momentum, BLOCK=ELEMWISE_BLOCK, **launch_opts(),
    )
    return count


def sync_(w: Tensor, prev: Tensor, bits: Tensor, bound: float) -> None:
    n = w.numel()
    if n:
        _sync_kernel[_grid(n)](
            storage(w), prev, bits, n, f32(bound), KIND=kind_of(w), BLOCK=ELEMWISE_BLOCK,
            **launch_opts(),
        )
