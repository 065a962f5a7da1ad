"""Shared pieces of the Triton backend: dtype codecs, exact fp32 helpers, launch options.

Importing this module imports triton, so it is only imported lazily (from the
package's functions), never by ``import blip_kernels``.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import triton
import triton.language as tl

from . import _compat

#: Whether kernels are (being) decorated for the interpreter. Triton reads the
#: variable when ``@triton.jit`` runs, i.e. when the kernel modules are imported.
INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0") == "1"
if INTERPRET:
    _compat.fix_interpreter_scalar_index()  # triton 3.6: loops over run-time bounds

#: Storage kinds of a parameter-like tensor, passed to kernels as a constexpr.
KIND_F32, KIND_F16, KIND_BF16 = 0, 1, 2
_KINDS = {torch.float32: KIND_F32, torch.float16: KIND_F16, torch.bfloat16: KIND_BF16}

#: Elementwise block size: big blocks amortise the interpreter's per-program
#: Python overhead; on CUDA 1024 elements saturate bandwidth. 8 warps give every
#: thread 4 elements, one 16-byte vector of fp32 and one 4-byte word of uint8 bits:
#: the same layout for both, so no shared-memory round trip before the stores
#: (4 warps cost 4 KB of shared memory per block on sm_80/sm_90; see aot_check).
ELEMWISE_BLOCK = 4096 if INTERPRET else 1024
ELEMWISE_WARPS = 8


def kind_of(t: torch.Tensor) -> int:
    return _KINDS[t.dtype]


def storage(t: torch.Tensor) -> torch.Tensor:
    """bf16 travels as its int16 bit pattern: the kernels round fp32 -> bf16
    themselves (the interpreter truncates instead of rounding to nearest)."""
    return t.view(torch.int16) if t.dtype == torch.bfloat16 else t


def f32(v: float) -> float:
    """``v`` rounded to fp32 as reference.py's ``_f32`` does, returned as an exactly
    representable Python float so triton's fp32 scalar argument holds the same value."""
    return float(torch.tensor(v, dtype=torch.float32).item())


def launch_opts() -> dict[str, Any]:
    """Compile options for the bit-exact kernels: no FMA contraction on GPU, so every
    multiply and add rounds as in reference.py (the interpreter never fuses)."""
    return {} if INTERPRET else {"enable_fp_fusion": False, "num_warps": ELEMWISE_WARPS}


def counter(device: torch.device) -> torch.Tensor:
    return torch.zeros((), dtype=torch.int64, device=device)


@triton.jit
def to_f32(v, KIND: tl.constexpr):
    """Widen a loaded storage value to fp32 (exact)."""
    if KIND == 2:
        # bf16 bits are the high half of the fp32 bits.
        bits = (v.to(tl.int32) & 0xFFFF) << 16
        return bits.to(tl.float32, bitcast=True)
    else:
        return v.to(tl.float32)


@triton.jit
def from_f32(x, KIND: tl.constexpr):
    """Round fp32 to the storage dtype, to nearest even."""
    if KIND == 2:
        u = x.to(tl.uint32, bitcast=True)
        # Round to nearest even on the 16 dropped bits (overflow carries into inf as
        # it should); NaN -> a quiet NaN (payloads are not part of the contract).
        r = (u + (0x7FFF + ((u >> 16) & 1))) >> 16
        r = tl.where(x != x, 0x7FC0, r)
        return r.to(tl.uint16).to(tl.int16, bitcast=True)
    elif KIND == 1:
        return x.to(tl.float16)
    else:
        return x


@triton.jit
def load_f32(ptr, offs, mask, KIND: tl.constexpr):
    return to_f32(tl.load(ptr + offs, mask=mask, other=0), KIND)


@triton.jit
def tile_offsets(rows, cols, row_stride):
    """``rows[:, None] * row_stride + cols[None, :]`` in int64: a Fisher buffer (and so a
    weight) may hold 2^31 elements, past int32."""
    return rows[:, None].to(tl.int64) * row_stride + cols[None, :]


@triton.jit
def is_finite(x):
    return tl.abs(x) <= 3.4028234663852886e38  # false for NaN and +-inf


@triton.jit
def pow2(bits):
    """Exact 2**bits in fp32 for integer 0 <= |bits| <= 126 (builds the exponent field)."""
    return ((bits + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def round_half_even(y):
    """rint(y) exactly, identical under the interpreter and on CUDA (libdevice is
    unavailable in the interpreter). Works on |y| so ties resolve by magnitude, then
    copies y's sign bit so -0.3 -> -0.0 like torch.round."""
    a = tl.abs(y)
    f = tl.floor(a)
    d = a - f  # exact for a < 2**23
    odd = (f - 2.0 * tl.floor(f * 0.5)) == 1.0
    up = (d > 0.5) | ((d == 0.5) & odd)
    r = tl.where(up, f + 1.0, f)
    sign = y.to(tl.uint32, bitcast=True) & 0x80000000
    signed = (r.to(tl.uint32, bitcast=True) | sign).to(tl.float32, bitcast=True)
    # |y| >= 2**23 is already an integer; NaN/inf fall through unchanged.
    return tl.where(a < 8388608.0, signed, y)


@triton.jit
def quantize_f32(w, bits, b):
    """Section 1 on fp32 values: rint(w / b * 2^bits) / 2^bits * b, 0 where bits == 0."""
    # div_rn: IEEE division on GPU too (reference.py divides, never multiplies by 1/b).
    y = tl.div_rn(w, b) * pow2(bits)
    # x * 2^-bits equals x / 2^bits exactly (same real value, one rounding).
    q = round_half_even(y) * pow2(-bits) * b
    return tl.where(bits == 0, 0.0, q)


@triton.jit
def project_f32(w, prev, bits, b, lim):
    """Section 4 on fp32 values, NaN/Inf weight -> prev first (reference._project_f32)."""
    r = b * pow2(-bits)
    w = tl.where(is_finite(w), w, prev)
    d = w - prev
    d = tl.maximum(tl.minimum(d, r, propagate_nan=tl.PropagateNan.ALL), -r,
                   propagate_nan=tl.PropagateNan.ALL)
    out = prev + d
    out = tl.minimum(tl.maximum(out, -lim, propagate_nan=tl.PropagateNan.ALL), lim,
                     propagate_nan=tl.PropagateNan.ALL)
    return out
