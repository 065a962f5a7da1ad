"""Section 6: Fisher accumulation, sum over samples of squared per-sample gradients.

* Linear on (N, in): ``(c*c)^T @ (x*x)`` as one fused GEMM: tiles are squared in
  registers, so no squared copy of x or c is written.
* Linear on (N, L, in) and Conv2d: the square does not factor. Each program owns an
  (out-tile, K-tile) of ``fisher_w`` and walks over its samples; a sample's gradient
  tile is ``sum_p c[n, o, p] * x_col[n, k, p]``, with ``x_col`` gathered on the fly
  (implicit im2col), squared and accumulated in registers. Neither per-sample
  gradients nor unfolded inputs are ever stored. Linear 3-D is the 1x1 "convolution"
  over L positions with channels-last strides.

fp32 throughout (``input_precision="ieee"``: TF32 would miss rtol 1e-5).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import INTERPRET, kind_of, load_f32, storage, tile_offsets


@triton.jit
def _fisher_linear2d_kernel(
    fw_ptr, fb_ptr, x_ptr, c_ptr, N, OUT, IN, scale,
    X_KIND: tl.constexpr, C_KIND: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_o = tl.program_id(0)
    pid_i = tl.program_id(1)
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    mo = offs_o < OUT
    mi = offs_i < IN
    rows = tl.arange(0, BLOCK_N)
    # c is read transposed, (BLOCK_O, BLOCK_N), so the dot needs no tl.trans.
    c_off = rows[None, :] * OUT + offs_o[:, None]
    x_off = rows[:, None] * IN + offs_i[None, :]
    acc = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
    bacc = tl.zeros((BLOCK_O,), dtype=tl.float32)
    # Advance base pointers instead of multiplying n * OUT, which could overflow int32;
    # the in-tile offsets above stay below BLOCK_N * max(OUT, IN) < 2^31 (launcher check).
    c_base = c_ptr
    x_base = x_ptr
    for n0 in range(0, N, BLOCK_N):
        mn = (n0 + rows) < N
        c = load_f32(c_base, c_off, mo[:, None] & mn[None, :], C_KIND)
        x = load_f32(x_base, x_off, mn[:, None] & mi[None, :], X_KIND)
        c2 = c * c
        acc = tl.dot(c2, x * x, acc, input_precision="ieee")
        if HAS_BIAS:
            bacc += tl.sum(c2, axis=1)
        c_base += BLOCK_N * OUT
        x_base += BLOCK_N * IN
    w_off = tile_offsets(offs_o, offs_i, IN)
    wm = mo[:, None] & mi[None, :]
    fw = tl.load(fw_ptr + w_off, mask=wm, other=0.0)
    tl.store(fw_ptr + w_off, fw + scale * acc, mask=wm)
    if HAS_BIAS:  # noqa: SIM102 - constexpr test outside, runtime test inside
        if pid_i == 0:
            fb = tl.load(fb_ptr + offs_o, mask=mo, other=0.0)
            tl.store(fb_ptr + offs_o, fb + scale * bacc, mask=mo)


@triton.jit
def _fisher_persample_kernel(
    fw_ptr, fb_ptr, x_ptr, c_ptr,
    N, COUT_G, K, P, CIN_G, H, W, WO,
    sxn_split, sxc, sxh, sxw, scn_split, sco, scp, sxn, scn,
    STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W, SPLIT_N, scale,
    KH: tl.constexpr, KW: tl.constexpr,
    X_KIND: tl.constexpr, C_KIND: tl.constexpr, HAS_BIAS: tl.constexpr,
    USE_ATOMIC: tl.constexpr,
    BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
):
    pid_o = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_z = tl.program_id(2)
    g = pid_z // SPLIT_N  # group
    s = pid_z % SPLIT_N  # this program's share of the samples: n = s, s + SPLIT_N, ...

    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    mo = offs_o < COUT_G
    o_glob = g * COUT_G + offs_o
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mk = offs_k < K
    # k -> (input channel, kernel row, kernel column), as unfold orders them.
    ci = offs_k // (KH * KW)
    kr = offs_k % (KH * KW)
    k_h = kr // KW
    k_w = kr % KW
    ch_off = (g * CIN_G + ci) * sxc
    lanes_p = tl.arange(0, BLOCK_P)

    acc = tl.zeros((BLOCK_O, BLOCK_K), dtype=tl.float32)
    bacc = tl.zeros((BLOCK_O,), dtype=tl.float32)
    # 64-bit sample offsets: a batch may hold 2^31 elements; offsets within one
    # sample stay 32-bit (the launcher checks that a sample is smaller than that).
    x_base = x_ptr + s.to(tl.int64) * sxn
    c_base = c_ptr + s.to(tl.int64) * scn
    for _n in range(s, N, SPLIT_N):
        grad = tl.zeros((BLOCK_O, BLOCK_K), dtype=tl.float32)  # this sample's gradient tile
        # The bias gradient: summed elementwise in the loop, reduced once after it.
        # (A tl.sum inside the loop whose result is used twice below trips an assertion
        # in Triton's OptimizeThreadLocality pass on sm_80/sm_90.)
        csum = tl.zeros((BLOCK_O, BLOCK_P), dtype=tl.float32)
        for p0 in range(0, P, BLOCK_P):
            offs_p = p0 + lanes_p
            mp = offs_p < P
            c = load_f32(c_base, o_glob[:, None] * sco + offs_p[None, :] * scp,
                         mo[:, None] & mp[None, :], C_KIND)
            oh = offs_p // WO
            ow = offs_p % WO
            ih = oh[:, None] * STRIDE_H - PAD_H + k_h[None, :] * DIL_H
            iw = ow[:, None] * STRIDE_W - PAD_W + k_w[None, :] * DIL_W
            # Padding taps are masked loads of 0 (the implicit im2col).
            mx = (mp[:, None] & mk[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W))
            xc = load_f32(x_base, ch_off[None, :] + ih * sxh + iw * sxw, mx, X_KIND)
            grad = tl.dot(c, xc, grad, input_precision="ieee")
            if HAS_BIAS:
                csum += c
        acc += grad * grad
        if HAS_BIAS:
            bsum = tl.sum(csum, axis=1)
            bacc += bsum * bsum
        x_base += sxn_split
        c_base += scn_split

    w_off = tile_offsets(o_glob, offs_k, K)
    wm = mo[:, None] & mk[None, :]
    if USE_ATOMIC:  # several programs share this tile (split over samples)
        tl.atomic_add(fw_ptr + w_off, scale * acc, mask=wm)
    else:
        fw = tl.load(fw_ptr + w_off, mask=wm, other=0.0)
        tl.store(fw_ptr + w_off, fw + scale * acc, mask=wm)
    if HAS_BIAS:  # noqa: SIM102 - constexpr test outside, runtime test inside
        if pid_k == 0:
            if USE_ATOMIC:
                tl.atomic_add(fb_ptr + o_glob, scale * bacc, mask=mo)
            else:
                fb = tl.load(fb_ptr + o_glob, mask=mo, other=0.0)
                tl.store(fb_ptr + o_glob, fb + scale * bacc, mask=mo)


#: Largest BLOCK_N of the Linear configs: its in-tile offsets reach BLOCK_N * max(OUT, IN).
_LINEAR_BLOCK_N = 32
_I32_MAX = 2**31 - 1

# Fixed tiles under the interpreter (autotune cannot run there); a few configs on CUDA,
# with the buffers restored between trials because the kernels accumulate into them.
_INTERP_LINEAR = {"BLOCK_O": 32, "BLOCK_I": 32, "BLOCK_N": _LINEAR_BLOCK_N}
_INTERP_PERSAMPLE = {"BLOCK_O": 32, "BLOCK_K": 32, "BLOCK_P": 32}

# Configs chosen so that no launch spills a register on sm_80 or sm_90 under triton 3.6
# and 3.7 (checked by `python3 -m blip_kernels.triton.aot_check`, odd and layer-like
# shapes): 128x128 tiles spill on unaligned shapes whatever the warps, 128x64 needs 8
# warps. The per-sample kernel gathers x (no cp.async), so a second pipeline stage only
# holds the next tiles in registers: one stage. Its configs set maxnreg=255: without it
# ptxas aims at a smaller register count (room for more resident programs) and spills a
# few bytes to reach it, e.g. 4-40 B at 72-168 registers under 3.6 and 8-20 B at the
# benchmark's conv 64->128 bf16 under 3.7; with it they use up to 168 (32x32) and 254
# (64x64x64) registers and spill nothing. 16 warps are out: 512 threads can have at most
# 128 registers each, where 64x64x64 spilled (48-88 B under 3.6).
# (BLOCK_O, BLOCK_I, warps, stages) and (BLOCK_O, BLOCK_K, BLOCK_P, warps, stages, maxnreg):
LINEAR_CONFIGS = ((64, 64, 4, 3), (128, 64, 8, 3), (64, 128, 8, 3))
PERSAMPLE_CONFIGS = ((32, 32, 32, 4, 1, 255), (64, 64, 32, 8, 1, 255), (64, 64, 64, 8, 1, 255))

if INTERPRET:
    _linear2d = _fisher_linear2d_kernel
    _persample = _fisher_persample_kernel
else:  # pragma: no cover - needs a GPU
    _linear2d = triton.autotune(
        configs=[
            triton.Config({"BLOCK_O": bo, "BLOCK_I": bi, "BLOCK_N": _LINEAR_BLOCK_N},
                          num_warps=w, num_stages=st)
            for bo, bi, w, st in LINEAR_CONFIGS
        ],
        key=["OUT", "IN", "N", "X_KIND", "C_KIND", "HAS_BIAS"],
        restore_value=["fw_ptr", "fb_ptr"],
    )(_fisher_linear2d_kernel)
    _persample = triton.autotune(
        configs=[
            triton.Config({"BLOCK_O": bo, "BLOCK_K": bk, "BLOCK_P": bp}, num_warps=w,
                          num_stages=st, maxnreg=regs)
            for bo, bk, bp, w, st, regs in PERSAMPLE_CONFIGS
        ],
        key=["COUT_G", "K", "P", "SPLIT_N", "X_KIND", "C_KIND", "HAS_BIAS"],
        restore_value=["fw_ptr", "fb_ptr"],
    )(_fisher_persample_kernel)


def _check_32bit(what: str, extent: int) -> None:
    """Offsets within a tile or a sample are int32 (int64 there would cost registers in
    the hot loops); refuse the sizes where they would wrap rather than read elsewhere."""
    if extent > _I32_MAX:
        raise ValueError(
            f"{what} is {extent:,}, past the 2^31-1 that the triton backend's Fisher kernels "
            "index with 32-bit offsets; use the cpp or torch backend for this layer"
        )


def _meta(fixed: dict[str, int]) -> dict[str, int]:
    return dict(fixed) if INTERPRET else {}


def split_for(n: int, tiles: int, sms: int) -> int:
    """Programs per output tile on a GPU of ``sms`` multiprocessors: two programs per SM
    in all when the layer has few tiles, at most 64 per tile and one per sample."""
    return max(1, min(n, -(-2 * sms // max(tiles, 1)), 64))


def _split_n(n: int, tiles: int, device: torch.device) -> int:
    """Programs per output tile: enough to fill the GPU when the layer has few tiles."""
    if INTERPRET or device.type != "cuda":
        return 1
    return split_for(n, tiles, torch.cuda.get_device_properties(device).multi_processor_count)


def fisher_linear_(
    fisher_w: Tensor, fisher_b: Tensor | None, x: Tensor, grad_out: Tensor, scale: float
) -> None:
    out_f, in_f = fisher_w.shape
    # in_f == 0 still has a bias gradient (one program column accumulates it).
    if x.shape[0] == 0 or out_f == 0 or (in_f == 0 and fisher_b is None):
        return
    fb = fisher_b if fisher_b is not None else fisher_w  # placeholder, never touched
    if x.dim() == 2:
        n = x.shape[0]
        _check_32bit("BLOCK_N * max(out_features, in_features)", _LINEAR_BLOCK_N * max(out_f, in_f))
        meta = _meta(_INTERP_LINEAR)

        def grid(m: dict[str, int]) -> tuple[int, int]:
            return (triton.cdiv(out_f, m["BLOCK_O"]), max(1, triton.cdiv(in_f, m["BLOCK_I"])))

        _linear2d[grid](
            fisher_w, fb, storage(x), storage(grad_out), n, out_f, in_f, float(scale),
            X_KIND=kind_of(x), C_KIND=kind_of(grad_out), HAS_BIAS=fisher_b is not None, **meta,
        )
        return
    n, length, _ = x.shape
    # (N, L, in) as a 1x1 convolution over an L x 1 image, channels last.
    _persample_launch(
        fisher_w, fisher_b, x, grad_out, n=n, groups=1, cout_g=out_f, k=in_f, p=length,
        cin_g=in_f, h=length, w=1, wo=1, x_strides=(length * in_f, 1, in_f, 0),
        c_strides=(length * out_f, 1, out_f), conv=((1, 1), (0, 0), (1, 1)), kernel=(1, 1),
        scale=scale,
    )


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
    out_ch, cin_g, kh, kw = fisher_w.shape
    n, c_in, h, w = x.shape
    ho, wo = grad_out.shape[2], grad_out.shape[3]
    if n == 0 or out_ch == 0 or (fisher_w.numel() == 0 and fisher_b is None):
        return
    _persample_launch(
        fisher_w, fisher_b, x, grad_out, n=n, groups=groups, cout_g=out_ch // groups,
        k=cin_g * kh * kw, p=ho * wo, cin_g=cin_g, h=h, w=w, wo=wo,
        x_strides=(c_in * h * w, h * w, w, 1), c_strides=(out_ch * ho * wo, ho * wo, 1),
        conv=(tuple(stride), tuple(padding), tuple(dilation)), kernel=(kh, kw), scale=scale,
    )


def _persample_launch(
    fisher_w: Tensor,
    fisher_b: Tensor | None,
    x: Tensor,
    grad_out: Tensor,
    *,
    n: int,
    groups: int,
    cout_g: int,
    k: int,
    p: int,
    cin_g: int,
    h: int,
    w: int,
    wo: int,
    x_strides: tuple[int, int, int, int],
    c_strides: tuple[int, int, int],
    conv: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]],
    kernel: tuple[int, int],
    scale: float,
) -> None:
    if p == 0:
        return  # no output positions: every per-sample gradient is zero
    _check_32bit("elements of x per sample", x[0].numel())
    _check_32bit("elements of grad_out per sample", grad_out[0].numel())
    (sh, sw), (ph, pw), (dh, dw) = conv
    sxn, sxc, sxh, sxw = x_strides
    scn, sco, scp = c_strides
    tiles = triton.cdiv(cout_g, 64) * triton.cdiv(k, 64) * groups
    split = _split_n(n, tiles, x.device)
    meta = _meta(_INTERP_PERSAMPLE)

    def grid(m: dict[str, int]) -> tuple[int, int, int]:
        # k == 0 (no inputs) still has a bias gradient: keep one program column.
        return (triton.cdiv(cout_g, m["BLOCK_O"]), max(1, triton.cdiv(k, m["BLOCK_K"])),
                groups * split)

    _persample[grid](
        fisher_w, fisher_b if fisher_b is not None else fisher_w, storage(x), storage(grad_out),
        n, cout_g, k, p, cin_g, h, w, wo,
        sxn * split, sxc, sxh, sxw, scn * split, sco, scp, sxn, scn,
        sh, sw, ph, pw, dh, dw, split, float(scale),
        KH=kernel[0], KW=kernel[1], X_KIND=kind_of(x), C_KIND=kind_of(grad_out),
        HAS_BIAS=fisher_b is not None, USE_ATOMIC=split > 1, **meta,
    )
