"""Pure-PyTorch backend: the executable specification of every BLIP op.

Every other backend must reproduce these functions (bit-exactly for quantize,
projection, sync and bits; to fp32 summation-order tolerance for Fisher). The
semantics are those of ``docs/semantics.md``; each function names its
section. All arithmetic is fp32; low-precision parameters are widened on load and
rounded to nearest on store.

Backend contract (shared by ``reference``, ``cpp`` and ``triton``): inputs are
already validated and contiguous by :mod:`blip_kernels.ops` (which also bumps the
version counters of the tensors a backend writes, unless the backend sets
``TRACKS_WRITES`` and does it itself); in-place functions mutate their first
arguments; ``project_``, ``sgd_step_`` and ``sgd_step_foreach_`` return an int64
0-d tensor counting the elements whose update was non-finite and was skipped.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

NAME = "reference"


def unavailable_reason(device: torch.device) -> str | None:
    # plain PyTorch runs wherever torch does, which for CUDA means a usable GPU
    if device.type == "cuda" and not torch.cuda.is_available():
        return "torch.cuda.is_available() is False"
    return None


#: fp32 constant of the bit-allocation rule (section 2): C = 0.5 / ln 2.
GAIN_SCALE = 0.5 / math.log(2.0)
#: Samples per chunk in the per-sample Fisher paths: bounds the extra memory
#: to CHUNK per-sample gradients instead of N.
FISHER_CHUNK = 4


def _f32(v: float, like: Tensor) -> Tensor:
    # A 0-d tensor on the same device keeps the op a true tensor-tensor fp32
    # division/multiplication (a Python scalar may be turned into a reciprocal).
    return torch.tensor(v, dtype=torch.float32, device=like.device)


_POW2: dict[tuple[torch.device, int], Tensor] = {}


def _pow2(bits: Tensor, sign: int) -> Tensor:
    """Exact 2**(sign*bits) in fp32 (a cached table lookup, not exp2)."""
    key = (bits.device, sign)
    table = _POW2.get(key)
    if table is None:
        table = torch.tensor(
            [2.0 ** (sign * i) for i in range(256)], dtype=torch.float32, device=bits.device
        )
        _POW2[key] = table
    return table[bits.long()]


def _quantize_f32(w: Tensor, bits: Tensor, bound: float) -> Tensor:
    b = _f32(bound, w)
    scale = _pow2(bits, 1)
    q = torch.round(w / b * scale) / scale * b
    return torch.where(bits == 0, torch.zeros_like(q), q)


def _project_f32(w: Tensor, prev: Tensor, bits: Tensor, bound: float, max_bit: int) -> Tensor:
    b = _f32(bound, w)
    r = b * _pow2(bits, -1)
    # A non-finite weight falls back to prev, the centre of its allowed interval; it
    # still takes the global clamp below (prev may sit at ±bound).
    w = torch.where(torch.isfinite(w), w, prev)
    out = prev + torch.maximum(torch.minimum(w - prev, r), -r)
    lim = b * _f32(1.0 - 2.0**-max_bit, w)
    return torch.minimum(torch.maximum(out, -lim), lim)


def quantize(w: Tensor, bits: Tensor, bound: float) -> Tensor:
    """Section 1: q = rint(w/bound * 2^bits) / 2^bits * bound; 0 where bits == 0."""
    return _quantize_f32(w.float(), bits, bound).to(w.dtype)


def project_(w: Tensor, prev: Tensor, bits: Tensor, bound: float, max_bit: int) -> Tensor:
    """Section 4: w = clamp(prev + clamp(w - prev, ±bound·2^-bits), ±bound·(1-2^-max_bit))."""
    wf = w.float()
    bad = ~torch.isfinite(wf)
    w.copy_(_project_f32(wf, prev, bits, bound, max_bit))
    return bad.sum()


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
    """torch.optim.SGD's update followed by section 4's projection.

    Elements whose gradient is NaN/Inf are skipped (weight and momentum left as
    they were, then projected) and counted.

    The update is written with the very ops of ``torch.optim.SGD.step`` so it rounds
    as torch does on this device: each ``add(y, alpha=a)`` is one rounding (an FMA on
    CPUs with AVX2 and on CUDA; see ``csrc/blip_math.h``), ``mul(momentum)`` another;
    the Python scalars become fp32 once. All math is fp32, also for bf16/fp16
    parameters (torch.optim.SGD would round each intermediate to the parameter dtype).
    """
    wf = w.float()
    g = grad.float()
    ok = torch.isfinite(g)
    g = torch.where(ok, g, torch.zeros_like(g))
    if weight_decay != 0:
        g = g.add(wf, alpha=weight_decay)
    if momentum_buf is not None and momentum != 0:
        buf = (momentum_buf * momentum).add_(g, alpha=1.0 - dampening)
        momentum_buf.copy_(torch.where(ok, buf, momentum_buf))
        g = g.add(buf, alpha=momentum) if nesterov else buf
    stepped = torch.where(ok, wf.add(g, alpha=-lr), wf)
    w.copy_(_project_f32(stepped, prev, bits, bound, max_bit))
    return (~ok).sum()


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
    """:func:`sgd_step_` on each ``ws[i]`` (all on one device); the summed skip count.

    ``momentum_bufs`` is None or one fp32 buffer per tensor; ``bounds[i]`` and
    ``dampenings[i]`` belong to ``ws[i]``.
    """
    total = torch.zeros((), dtype=torch.int64, device=ws[0].device if ws else None)
    for i, w in enumerate(ws):
        buf = None if momentum_bufs is None else momentum_bufs[i]
        total = total + sgd_step_(w, grads[i], prevs[i], bits[i], buf, bounds[i], max_bit, lr,
                                  momentum, dampenings[i], nesterov, weight_decay)
    return total


def update_bits_(bits: Tensor, fisher: Tensor, fisher_old: Tensor, task: int, max_bit: int) -> None:
    """Sections 2 and 3: grow bits by the information gain, fold F into F_old, zero F."""
    t1 = _f32(float(task + 1), fisher)
    t2 = _f32(float(task + 2), fisher)
    gain = _f32(GAIN_SCALE, fisher) * torch.log((fisher + fisher_old * t1) / (fisher_old * t2))
    grow = torch.ceil(gain)
    # NaN gain (0/0) grows nothing; +inf grows to the cap. Compare in float before
    # the integer cast so neither can overflow.
    grow = torch.where(grow > 0, grow, torch.zeros_like(grow)).clamp(max=float(max_bit))
    new_bits = (bits.to(torch.int32) + grow.to(torch.int32)).clamp(max=max_bit)
    bits.copy_(new_bits.to(torch.uint8))
    fisher_old.copy_((fisher_old * t1 + fisher) / t2)
    fisher.zero_()


def sync_(w: Tensor, prev: Tensor, bits: Tensor, bound: float) -> None:
    """Section 5: w = quantize(w); prev = w."""
    q = _quantize_f32(w.float(), bits, bound)
    w.copy_(q)
    prev.copy_(w.float())


def fisher_linear_(
    fisher_w: Tensor, fisher_b: Tensor | None, x: Tensor, grad_out: Tensor, scale: float
) -> None:
    """Section 6, Linear: fisher_w += scale·Σ_n (c_n ⊗ x_n)^2 (per sample summed over L for 3-D)."""
    x = x.float()
    c = grad_out.float()
    if x.dim() == 2:
        fisher_w.add_((c * c).t() @ (x * x), alpha=scale)
        if fisher_b is not None:
            fisher_b.add_((c * c).sum(0), alpha=scale)
        return
    for s in range(0, x.shape[0], FISHER_CHUNK):
        xs, cs = x[s : s + FISHER_CHUNK], c[s : s + FISHER_CHUNK]
        g = torch.bmm(cs.transpose(1, 2), xs)  # (chunk, out, in): per-sample gradients
        fisher_w.add_((g * g).sum(0), alpha=scale)
        if fisher_b is not None:
            gb = cs.sum(1)
            fisher_b.add_((gb * gb).sum(0), alpha=scale)


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
    """Section 6, Conv2d: per-sample gradients by unfold + GEMM, squared and summed."""
    out_ch, cin_g, kh, kw = fisher_w.shape
    n = x.shape[0]
    cout_g = out_ch // groups
    for s in range(0, n, FISHER_CHUNK):
        xs = x[s : s + FISHER_CHUNK].float()
        cs = grad_out[s : s + FISHER_CHUNK].float()
        m = xs.shape[0]
        cols = torch.nn.functional.unfold(xs, (kh, kw), dilation, padding, stride)
        cols = cols.view(m, groups, cin_g * kh * kw, -1)  # (m, G, K, P)
        co = cs.reshape(m, groups, cout_g, -1)  # (m, G, Cout_g, P)
        g = torch.einsum("mgop,mgkp->mgok", co, cols)  # per-sample gradients
        fisher_w.add_((g * g).sum(0).reshape(fisher_w.shape), alpha=scale)
        if fisher_b is not None:
            gb = cs.flatten(2).sum(2)
            fisher_b.add_((gb * gb).sum(0), alpha=scale)
