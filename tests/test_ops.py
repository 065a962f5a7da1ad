"""Every backend against the conformance vectors and the reference backend."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import blip_kernels as bk
from blip_kernels import backends
from blip_kernels import reference as ref

SIZES = [1, 7, 1023, 1025, 3333]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
MAX_BIT = 20


def u8(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.uint8)


def state(n: int, dtype: torch.dtype, device: str, seed: int = 0, bound: float = 0.3):
    """A weight near a quantized prev, as during training."""
    g = torch.Generator().manual_seed(seed)
    bits = torch.randint(0, MAX_BIT + 1, (n,), generator=g).to(torch.uint8)
    prev = ref.quantize((torch.rand(n, generator=g) * 2 - 1) * bound, bits, bound)
    w = prev + torch.randn(n, generator=g) * bound * 2.0 ** -torch.randint(0, 12, (n,), generator=g)
    return w.to(dtype).to(device), prev.to(device), bits.to(device)


# ---------------------------------------------------------------- conformance


def test_conformance_quantize(backend, vectors):
    w, bits = vectors["quant_theta"].to(backend), u8(vectors["quant_bits"]).to(backend)
    out = bk.quantize(w, bits, float(vectors["quant_bound"]))
    assert torch.equal(out.cpu(), vectors["quant_out"])


@pytest.mark.parametrize("t", [0, 1, 3])
def test_conformance_bits_and_fisher_fold(backend, vectors, t):
    p = f"bits_t{t}_"
    bits = u8(vectors[p + "before"]).to(backend)
    fisher = vectors[p + "fisher"].clone().to(backend)
    fisher_old = vectors[p + "fisher_old"].clone().to(backend)
    bk.update_bits_(bits, fisher, fisher_old, t, int(vectors["bits_max_bit"]))
    expected, ambiguous = vectors[p + "after"], vectors[p + "ambiguous"]
    assert torch.equal(bits.cpu().long()[~ambiguous], expected[~ambiguous])
    torch.testing.assert_close(fisher_old.cpu(), vectors[p + "fisher_old_next"], rtol=1e-6, atol=0)
    assert not fisher.any()


@pytest.mark.parametrize("kind", ["weight", "bias"])
def test_conformance_projection_then_sync(backend, vectors, kind):
    if kind == "weight":
        w, prev, bits = vectors["clip_weight_in"], vectors["clip_prev"], vectors["clip_bits"]
        bound = float(vectors["clip_bound"])
    else:
        w, prev = vectors["clip_bias_in"], vectors["clip_bias_prev"]
        bits = vectors["clip_bias_bits"]
        bound = 1.0
    max_bit = int(vectors["clip_max_bit"])
    w, prev, bits = w.clone().to(backend), prev.clone().to(backend), u8(bits).to(backend)
    with bk.use_backend("reference"):
        expected = w.clone()
        bk.project_(expected, prev, bits, bound, max_bit)
    assert bk.project_(w, prev, bits, bound, max_bit).item() == 0
    assert torch.equal(w, expected)
    bk.sync_(w, prev, bits, bound)
    assert torch.equal(w.cpu(), vectors[f"sync_{kind}_out"])
    assert torch.equal(prev, w)


def test_conformance_clip_vectors_are_sync_vectors(vectors):
    # The npz's clip_*_out arrays hold the weights after clipping AND sync (the
    # generator kept a reference to the tensor that sync_weight then overwrote):
    # they equal sync_*_out and lie on the quantization grid, so projection is
    # checked through sync(project(w)) above and against the reference.
    assert torch.equal(vectors["clip_weight_out"], vectors["sync_weight_out"])
    assert torch.equal(vectors["clip_bias_out"], vectors["sync_bias_out"])


def test_conformance_fisher_linear(backend, vectors):
    x, c = vectors["fisher_lin_x"].to(backend), vectors["fisher_lin_costate"].to(backend)
    fw = torch.zeros(c.shape[1], x.shape[1], device=backend)
    fb = torch.zeros(c.shape[1], device=backend)
    bk.fisher_linear_(fw, fb, x, c, 1.0)
    torch.testing.assert_close(fw.cpu(), vectors["fisher_lin_w"], rtol=1e-5, atol=0)
    torch.testing.assert_close(fb.cpu(), vectors["fisher_lin_b"], rtol=1e-5, atol=0)


@pytest.mark.parametrize("i", [0, 1, 2])
def test_conformance_fisher_conv2d(backend, vectors, i):
    cin, cout, k, stride, pad, dil = vectors[f"fisher_conv{i}_cfg"].tolist()
    x, c = vectors[f"fisher_conv{i}_x"].to(backend), vectors[f"fisher_conv{i}_costate"].to(backend)
    fw = torch.zeros(cout, cin, k, k, device=backend)
    fb = torch.zeros(cout, device=backend)
    bk.fisher_conv2d_(fw, fb, x, c, stride, pad, dil, 1, 1.0)
    torch.testing.assert_close(fw.cpu(), vectors[f"fisher_conv{i}_w"], rtol=1e-5, atol=0)
    torch.testing.assert_close(fb.cpu(), vectors[f"fisher_conv{i}_b"], rtol=1e-5, atol=0)


# ---------------------------------------------------------- against reference


def on_reference(fn, *args):
    """Run fn on clones of args with the reference backend; return the clones."""
    clones = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    with bk.use_backend("reference"):
        result = fn(*clones)
    return result, clones


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_matches_reference(backend, n, dtype):
    w, _, bits = state(n, dtype, backend, seed=n)
    expected, _ = on_reference(bk.quantize, w, bits, 0.3)
    out = bk.quantize(w, bits, 0.3)
    assert out.dtype == dtype
    assert torch.equal(out, expected)


def test_quantize_ties_round_half_to_even(backend):
    bits = torch.full((6,), 2, dtype=torch.uint8, device=backend)
    w = torch.tensor([0.125, 0.375, -0.125, -0.375, 0.625, 0.0], device=backend)  # x·4 = ±.5, ±1.5
    out = bk.quantize(w, bits, 1.0)
    assert out.tolist() == [0.0, 0.5, -0.0, -0.5, 0.5, 0.0]


def test_quantize_ste_passes_gradient(backend):
    w, _, bits = state(1025, torch.float32, backend)
    w.requires_grad_(True)
    g = torch.randn_like(w)
    bk.quantize_ste(w, bits, 0.3).backward(g)
    assert torch.equal(w.grad, g)
    assert not bk.quantize(w, bits, 0.3).requires_grad


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_project_matches_reference(backend, n, dtype):
    w, prev, bits = state(n, dtype, backend, seed=n + 1)
    w[0] = float("nan")
    count_ref, (w_ref, *_) = on_reference(bk.project_, w, prev, bits, 0.3, MAX_BIT)
    count = bk.project_(w, prev, bits, 0.3, MAX_BIT)
    assert count.item() == count_ref.item() == 1
    assert torch.equal(w, w_ref)


def test_non_finite_weight_at_the_range_edge_still_takes_the_global_clamp(backend):
    # prev = quantize(bound) = bound lies outside ±bound·(1-2^-max_bit); a NaN/Inf weight
    # falls back to prev and must still be clamped into the range.
    prev = torch.ones(3, device=backend)
    bits = torch.ones(3, dtype=torch.uint8, device=backend)
    w = torch.tensor([float("nan"), float("inf"), 1.0], device=backend)
    assert bk.project_(w, prev, bits, 1.0, MAX_BIT).item() == 2
    assert torch.equal(w, torch.full_like(w, 1 - 2.0**-MAX_BIT))
    w = torch.ones(3, device=backend)
    grad = torch.tensor([-3e38, float("nan"), 0.0], device=backend)  # w - lr·g overflows
    bk.constrained_sgd_step_(w, grad, prev, bits, 1.0, MAX_BIT, 10.0)
    assert torch.equal(w, torch.full_like(w, 1 - 2.0**-MAX_BIT))


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "hp",
    [
        {},
        {"momentum": 0.9},
        {"momentum": 0.9, "dampening": 0.1, "weight_decay": 1e-3},
        {"momentum": 0.5, "nesterov": True, "weight_decay": 5e-4},
    ],
    ids=["plain", "momentum", "damp-wd", "nesterov"],
)
def test_sgd_step_matches_reference(backend, n, dtype, hp):
    w, prev, bits = state(n, dtype, backend, seed=n + 2)
    grad = (torch.randn(n) * 3).to(dtype).to(backend)
    grad[n // 2] = float("inf") if n > 1 else grad[0]
    buf = torch.randn(n, device=backend) if hp.get("momentum") else None
    args = (w, grad, prev, bits, 0.3, MAX_BIT, 0.05, buf)
    count_ref, clones = on_reference(lambda *a: bk.constrained_sgd_step_(*a, **hp), *args)
    count = bk.constrained_sgd_step_(*args, **hp)
    assert count.item() == count_ref.item() == (1 if n > 1 else 0)
    assert torch.equal(w, clones[0])
    if buf is not None:
        assert torch.equal(buf, clones[7])


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("task", [0, 2])
def test_update_bits_matches_reference(backend, n, task):
    g = torch.Generator().manual_seed(n)
    bits = torch.randint(0, MAX_BIT + 1, (n,), generator=g).to(torch.uint8).to(backend)
    fisher = (torch.rand(n, generator=g) ** 8 * 1e-6).to(backend)
    fisher_old = (torch.rand(n, generator=g) * 1e-9 + 1e-14).to(backend)
    if n > 2:
        fisher[0], fisher_old[0] = 0.0, 0.0  # 0/0: NaN gain grows nothing
        fisher[1], fisher_old[1] = 1.0, 0.0  # +inf gain: capped
    _, (b_ref, f_ref, fo_ref, *_) = on_reference(
        bk.update_bits_, bits, fisher, fisher_old, task, MAX_BIT
    )
    bk.update_bits_(bits, fisher, fisher_old, task, MAX_BIT)
    assert torch.equal(bits, b_ref)
    assert torch.equal(fisher_old, fo_ref)
    assert not fisher.any() and not f_ref.any()
    assert int(bits.max()) <= MAX_BIT


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_sync_matches_reference(backend, n, dtype):
    w, prev, bits = state(n, dtype, backend, seed=n + 3)
    _, (w_ref, p_ref, *_) = on_reference(bk.sync_, w, prev, bits, 0.3)
    bk.sync_(w, prev, bits, 0.3)
    assert torch.equal(w, w_ref) and torch.equal(prev, p_ref)


def test_non_contiguous_inputs(backend):
    w_full, prev_full, bits_full = state(2 * 1025, torch.float32, backend, seed=9)
    w, prev, bits = w_full[::2], prev_full[::2], bits_full[::2]
    grad = torch.randn(2 * 1025, device=backend)[1::2]
    _, clones = on_reference(bk.constrained_sgd_step_, w, grad, prev, bits, 0.3, MAX_BIT, 0.1)
    untouched = w_full[1::2].clone()
    bk.constrained_sgd_step_(w, grad, prev, bits, 0.3, MAX_BIT, 0.1)
    assert torch.equal(w, clones[0])
    assert torch.equal(w_full[1::2], untouched)
    mat = torch.randn(31, 17, device=backend).t()  # transposed view
    bits2 = torch.randint(0, 21, (17, 31), dtype=torch.uint8, device=backend)
    expected, _ = on_reference(bk.quantize, mat, bits2, 0.3)
    assert torch.equal(bk.quantize(mat, bits2, 0.3), expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(13, 1, 9), (7, 33), (1, 1), (5, 3, 65)], ids=str)
def test_fisher_linear_matches_reference(backend, dtype, shape):
    g = torch.Generator().manual_seed(sum(shape))
    *lead, in_f = shape
    out_f = 5
    x = torch.randn(*lead, in_f, generator=g).to(dtype).to(backend)
    c = torch.randn(*lead, out_f, generator=g).to(dtype).to(backend)
    fw = torch.rand(out_f, in_f, generator=g).to(backend)
    fb = torch.rand(out_f, generator=g).to(backend)
    _, (fw_ref, fb_ref, *_) = on_reference(bk.fisher_linear_, fw, fb, x, c, 0.25)
    bk.fisher_linear_(fw, fb, x, c, 0.25)
    torch.testing.assert_close(fw, fw_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fb, fb_ref, rtol=1e-5, atol=1e-6)
    bk.fisher_linear_(fw, None, x, c, 1.0)  # bias is optional


CONV_CASES = [
    # n, cin, cout, h, w, k, stride, padding, dilation, groups
    (3, 3, 8, 9, 9, 3, 1, 1, 1, 1),
    (5, 4, 6, 8, 7, 2, 2, 0, 1, 2),
    (2, 6, 9, 11, 10, 3, (2, 1), (1, 2), (2, 1), 3),
    (1, 1, 1, 5, 5, 1, 1, 0, 1, 1),
]


@pytest.mark.parametrize("case", CONV_CASES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_fisher_conv2d_matches_reference(backend, case, dtype):
    n, cin, cout, h, w, k, stride, pad, dil, groups = case
    g = torch.Generator().manual_seed(n * cin)
    x = torch.randn(n, cin, h, w, generator=g)
    conv = torch.nn.Conv2d(cin, cout, k, stride, pad, dil, groups)
    c = torch.randn_like(conv(x), memory_format=torch.contiguous_format)
    x, c = x.to(dtype).to(backend), c.to(dtype).to(backend)
    fw = torch.zeros(cout, cin // groups, k, k, device=backend)
    fb = torch.zeros(cout, device=backend)
    _, (fw_ref, fb_ref, *_) = on_reference(
        bk.fisher_conv2d_, fw, fb, x, c, stride, pad, dil, groups, 0.5
    )
    bk.fisher_conv2d_(fw, fb, x, c, stride, pad, dil, groups, 0.5)
    torch.testing.assert_close(fw, fw_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fb, fb_ref, rtol=1e-5, atol=1e-6)


def test_fisher_equals_per_sample_autograd(backend):
    """The squared per-sample gradients, computed the slow way with autograd (on the CPU:
    on CUDA, cuDNN's conv backward may use TF32, which misses rtol 1e-5 by itself)."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3, stride=2, padding=1)
    x = torch.randn(6, 3, 7, 7)
    c = torch.randn_like(conv(x))
    expected_w = torch.zeros_like(conv.weight)
    expected_b = torch.zeros_like(conv.bias)
    for i in range(len(x)):
        gw, gb = torch.autograd.grad(conv(x[i : i + 1]), (conv.weight, conv.bias), c[i : i + 1])
        expected_w += gw**2
        expected_b += gb**2
    fw = torch.zeros_like(expected_w, device=backend)
    fb = torch.zeros_like(expected_b, device=backend)
    bk.fisher_conv2d_(fw, fb, x.to(backend), c.detach().to(backend), 2, 1)
    torch.testing.assert_close(fw.cpu(), expected_w, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fb.cpu(), expected_b, rtol=1e-5, atol=1e-6)


# ------------------------------------------------ fused step vs unfused loop


@pytest.mark.parametrize(
    "hp",
    [
        {"momentum": 0.9},
        {"momentum": 0.9, "nesterov": True, "weight_decay": 1e-3},
        {"momentum": 0.8, "dampening": 0.3, "weight_decay": 5e-4},
        {"weight_decay": 1e-2},
    ],
    ids=["momentum", "nesterov-wd", "dampening-wd", "wd"],
)
def test_fused_step_tracks_torch_sgd_plus_projection(backend, hp):
    torch.manual_seed(1)
    n, bound, lr = 3333, 0.2, 0.05
    bits = torch.randint(0, 9, (n,), dtype=torch.uint8, device=backend)
    prev = bk.quantize(torch.empty(n, device=backend).uniform_(-bound, bound), bits, bound)
    w_fused = prev.clone()
    p = torch.nn.Parameter(prev.clone())
    opt = torch.optim.SGD([p], lr=lr, **hp)
    buf = torch.zeros(n, device=backend)
    for step in range(60):
        grad = torch.randn(n, device=backend)
        p.grad = grad.clone()
        opt.step()
        with bk.use_backend("reference"), torch.no_grad():
            bk.project_(p.data, prev, bits, bound, MAX_BIT)
        damp = 0.0 if step == 0 else hp.get("dampening", 0.0)  # torch's first step: buf = grad
        bk.constrained_sgd_step_(
            w_fused, grad, prev, bits, bound, MAX_BIT, lr,
            momentum_buf=buf, **{**hp, "dampening": damp},
        )
        # Projection snaps both to the same boundary; inside it, only fp32
        # rounding order (fused multiply-adds in torch's kernels) differs.
        torch.testing.assert_close(w_fused, p.data, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------- foreach (multi-tensor) step


FOREACH_HP = [
    {},
    {"momentum": 0.9, "dampening": [0.0, 0.1, 0.0, 0.5, 0.2], "weight_decay": 1e-3},
    {"momentum": 0.5, "nesterov": True, "weight_decay": 5e-4},
]


def foreach_case(backend: str, with_buf: bool):
    """Five parameters of mixed sizes, dtypes and bounds, NaN/Inf in some gradients."""
    sizes, bounds = [7, 1025, 1, 3333, 64], [0.3, 1.0, 0.05, 0.2, 0.7]
    ws, grads, prevs, bits, bufs = [], [], [], [], []
    for i, (n, bound) in enumerate(zip(sizes, bounds, strict=True)):
        dtype = DTYPES[i % len(DTYPES)]
        w, prev, b = state(n, dtype, backend, seed=100 + i, bound=bound)
        g = (torch.randn(n, generator=torch.Generator().manual_seed(i)) * 3).to(dtype).to(backend)
        if n > 1:
            g[n // 3] = float("nan") if i % 2 else float("inf")
        ws.append(w), grads.append(g), prevs.append(prev), bits.append(b)
        bufs.append(torch.randn(n, device=backend))
    return ws, grads, prevs, bits, bounds, (bufs if with_buf else None)


@pytest.mark.parametrize("hp", FOREACH_HP, ids=["plain", "momentum-damp-list", "nesterov-wd"])
def test_sgd_foreach_equals_single_tensor_op(backend, hp):
    ws, grads, prevs, bits, bounds, bufs = foreach_case(backend, "momentum" in hp)
    damps = hp.get("dampening", 0.0)
    single = {k: v for k, v in hp.items() if k != "dampening"}
    ws_1 = [w.clone() for w in ws]
    bufs_1 = None if bufs is None else [b.clone() for b in bufs]
    expected = 0
    for i in range(len(ws)):
        d = damps[i] if isinstance(damps, list) else damps
        expected += bk.constrained_sgd_step_(
            ws_1[i], grads[i], prevs[i], bits[i], bounds[i], MAX_BIT, 0.05,
            None if bufs_1 is None else bufs_1[i], dampening=d, **single,
        ).item()
    count = bk.constrained_sgd_step_foreach_(
        ws, grads, prevs, bits, bounds, MAX_BIT, 0.05, bufs, dampenings=damps, **single
    )
    assert count.dtype == torch.int64 and count.dim() == 0
    assert count.item() == expected == 4
    for i in range(len(ws)):
        assert ws[i].dtype == ws_1[i].dtype
        assert torch.equal(ws[i], ws_1[i]), f"ws[{i}]"
        if bufs is not None:
            assert torch.equal(bufs[i], bufs_1[i]), f"momentum_bufs[{i}]"


def test_sgd_foreach_matches_reference(backend):
    ws, grads, prevs, bits, bounds, bufs = foreach_case(backend, True)
    args = (ws, grads, prevs, bits, bounds, MAX_BIT, 0.05, bufs, 0.9, [0.0, 0.3, 0.0, 0.1, 1.0])
    clones = ([w.clone() for w in ws], [b.clone() for b in bufs])
    with bk.use_backend("reference"):
        count_ref = bk.constrained_sgd_step_foreach_(
            clones[0], grads, prevs, bits, bounds, MAX_BIT, 0.05, clones[1], *args[8:]
        )
    assert bk.constrained_sgd_step_foreach_(*args).item() == count_ref.item()
    assert all(torch.equal(a, b) for a, b in zip(ws, clones[0], strict=True))
    assert all(torch.equal(a, b) for a, b in zip(bufs, clones[1], strict=True))


def test_sgd_foreach_non_contiguous_and_empty(backend):
    w_full, prev_full, bits_full = state(2 * 1025, torch.float32, backend, seed=9)
    w, prev, bits = w_full[::2], prev_full[::2], bits_full[::2]
    grad = torch.randn(2 * 1025, device=backend)[1::2]
    buf_full = torch.randn(2 * 1025, device=backend)
    buf = buf_full[::2]
    w2, prev2, bits2 = state(33, torch.bfloat16, backend, seed=10)
    grad2 = torch.randn(33, device=backend).to(torch.bfloat16)
    _, clones = on_reference(
        lambda *a: bk.constrained_sgd_step_(*a, momentum=0.9), w, grad, prev, bits, 0.3,
        MAX_BIT, 0.1, buf,
    )
    untouched = w_full[1::2].clone(), buf_full[1::2].clone()
    w2_expected = w2.clone()
    bk.constrained_sgd_step_(w2_expected, grad2, prev2, bits2, 1.0, MAX_BIT, 0.1,
                             torch.zeros(33, device=backend), momentum=0.9)
    bk.constrained_sgd_step_foreach_([w, w2], [grad, grad2], [prev, prev2], [bits, bits2],
                                     [0.3, 1.0], MAX_BIT, 0.1,
                                     [buf, torch.zeros(33, device=backend)], momentum=0.9)
    assert torch.equal(w, clones[0]) and torch.equal(buf, clones[7])
    assert torch.equal(w_full[1::2], untouched[0]) and torch.equal(buf_full[1::2], untouched[1])
    assert torch.equal(w2, w2_expected)
    empty = bk.constrained_sgd_step_foreach_([], [], [], [], [], MAX_BIT, 0.1)
    assert empty.item() == 0


def test_sgd_foreach_errors_name_the_index():
    ws, grads, prevs, bits, bounds, bufs = foreach_case("cpu", True)
    args = (ws, grads, prevs, bits, bounds, MAX_BIT, 0.1)

    def bad(i: int, lst: list, value: object) -> list:
        return [value if j == i else x for j, x in enumerate(lst)]

    with pytest.raises(ValueError, match=r"prevs\[3\] has shape"):
        bk.constrained_sgd_step_foreach_(ws, grads, bad(3, prevs, prevs[3][:5]), *args[3:])
    with pytest.raises(TypeError, match=r"grads\[2\] must have dtype float16"):
        bk.constrained_sgd_step_foreach_(ws, bad(2, grads, grads[2].float()), *args[2:])
    with pytest.raises(TypeError, match=r"bits\[1\] must have dtype uint8"):
        bk.constrained_sgd_step_foreach_(ws, grads, prevs, bad(1, bits, bits[1].long()), *args[4:])
    with pytest.raises(ValueError, match=r"bits\[4\] must be <= max_bit=20"):
        bk.constrained_sgd_step_foreach_(
            ws, grads, prevs, bad(4, bits, torch.full_like(bits[4], 22)), *args[4:])
    with pytest.raises(ValueError, match=r"bounds\[0\] must be a positive"):
        bk.constrained_sgd_step_foreach_(*args[:4], bad(0, bounds, -1.0), MAX_BIT, 0.1)
    with pytest.raises(TypeError, match=r"ws\[3\] must have dtype"):
        bk.constrained_sgd_step_foreach_(bad(3, ws, ws[3].double()), *args[1:])
    with pytest.raises(ValueError, match=r"ws\[1\] is on meta"):
        bk.constrained_sgd_step_foreach_(bad(1, ws, ws[1].to("meta")), *args[1:])
    with pytest.raises(ValueError, match="grads has 4 entries; ws has 5"):
        bk.constrained_sgd_step_foreach_(ws, grads[:4], *args[2:])
    with pytest.raises(ValueError, match="momentum_bufs is required"):
        bk.constrained_sgd_step_foreach_(*args, momentum=0.9)
    with pytest.raises(ValueError, match=r"momentum_bufs\[2\] is required"):
        bk.constrained_sgd_step_foreach_(*args, bad(2, bufs, None), momentum=0.9)
    with pytest.raises(TypeError, match=r"momentum_bufs\[0\] must have dtype float32"):
        bk.constrained_sgd_step_foreach_(*args, bad(0, bufs, bufs[0].half()), momentum=0.9)
    with pytest.raises(ValueError, match=r"dampenings\[1\] must be in \[0, 1\]"):
        bk.constrained_sgd_step_foreach_(*args, bufs, 0.9, [0.0, 2.0, 0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="dampenings has 2 entries; ws has 5"):
        bk.constrained_sgd_step_foreach_(*args, bufs, 0.9, [0.0, 0.0])
    with pytest.raises(ValueError, match=r"nesterov requires .*dampenings\[3\] is 0.5"):
        bk.constrained_sgd_step_foreach_(*args, bufs, 0.9, [0.0, 0.0, 0.0, 0.5, 0.0], True)


# -------------------------------------------------------------- bad input


def test_errors_name_the_argument():
    w, prev, bits = state(10, torch.float32, "cpu")
    grad = torch.randn(10)
    with pytest.raises(ValueError, match="prev has shape"):
        bk.project_(w, prev[:5], bits, 0.3, MAX_BIT)
    with pytest.raises(TypeError, match="bits must have dtype uint8"):
        bk.project_(w, prev, bits.long(), 0.3, MAX_BIT)
    with pytest.raises(ValueError, match="bits must be <= max_bit=4"):
        bk.project_(w, prev, torch.full_like(bits, 7), 0.3, 4)
    with pytest.raises(ValueError, match="bound must be a positive"):
        bk.project_(w, prev, bits, 0.0, MAX_BIT)
    with pytest.raises(ValueError, match="bound must be a positive"):
        bk.quantize(w, bits, -1.0)
    with pytest.raises(TypeError, match="grad must have dtype float32"):
        bk.constrained_sgd_step_(w, grad.half(), prev, bits, 0.3, MAX_BIT, 0.1)
    with pytest.raises(ValueError, match="momentum_buf is required"):
        bk.constrained_sgd_step_(w, grad, prev, bits, 0.3, MAX_BIT, 0.1, momentum=0.9)
    with pytest.raises(ValueError, match="nesterov requires"):
        bk.constrained_sgd_step_(w, grad, prev, bits, 0.3, MAX_BIT, 0.1, torch.zeros(10),
                                 momentum=0.9, dampening=0.1, nesterov=True)
    with pytest.raises(TypeError, match="w must have dtype"):
        bk.quantize(w.double(), bits, 0.3)
    with pytest.raises(ValueError, match="max_bit must be"):
        bk.update_bits_(bits, torch.zeros(10), torch.ones(10), 0, 40)
    with pytest.raises(TypeError, match="prev must have dtype float32"):
        bk.sync_(w, prev.half(), bits, 0.3)
    with pytest.raises(ValueError, match="grad_out has shape"):
        bk.fisher_linear_(torch.zeros(3, 4), None, torch.randn(5, 4), torch.randn(6, 3))
    with pytest.raises(ValueError, match="fisher_w has shape"):
        bk.fisher_linear_(torch.zeros(4, 3), None, torch.randn(5, 4), torch.randn(5, 3))
    with pytest.raises(ValueError, match="grad_out has shape"):
        bk.fisher_conv2d_(torch.zeros(2, 3, 3, 3), None, torch.randn(1, 3, 8, 8),
                          torch.randn(1, 2, 8, 8))
    with pytest.raises(ValueError, match="groups=2"):
        bk.fisher_conv2d_(torch.zeros(2, 3, 3, 3), None, torch.randn(1, 3, 8, 8),
                          torch.randn(1, 2, 6, 6), groups=2)
    with pytest.raises(ValueError, match="task must be an int"):
        bk.update_bits_(bits, torch.zeros(10), torch.ones(10), True, MAX_BIT)
    with pytest.raises(ValueError, match="bits must be <= max_bit=24"):
        bk.quantize(w, torch.full_like(bits, 130), 0.3)
    with pytest.raises(ValueError, match="scale must be a finite number >= 0"):
        bk.fisher_linear_(torch.zeros(3, 4), None, torch.randn(5, 4), torch.randn(5, 3), -1.0)
    with pytest.raises(ValueError, match="larger than the padded input 5x5"):
        bk.fisher_conv2d_(torch.zeros(2, 3, 7, 7), None, torch.randn(1, 3, 5, 5),
                          torch.randn(1, 2, 1, 1))
    bk.update_bits_(bits, torch.zeros(10), torch.ones(10), np.int64(1), np.int64(MAX_BIT))
    with bk.value_checks(False):  # the data-dependent check can be switched off
        bk.project_(w, prev, torch.full_like(bits, 7), 0.3, 8)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device type")
def test_mixed_devices_rejected():
    w, prev, bits = state(10, torch.float32, "cuda")
    with pytest.raises(ValueError, match="prev is on cpu"):
        bk.project_(w, prev.cpu(), bits, 0.3, MAX_BIT)


def test_mixed_devices_rejected_meta():
    # A second device type exists on every machine: meta tensors.
    w, prev, bits = state(10, torch.float32, "cpu")
    with pytest.raises(ValueError, match="prev is on meta"):
        bk.project_(w, prev.to("meta"), bits, 0.3, MAX_BIT)


# ------------------------------------------------------ backend selection


def test_backend_selection():
    assert bk.current_backend("cpu") in bk.available_backends("cpu")
    with bk.use_backend("torch"):
        assert bk.current_backend("cpu") == "reference"
    with pytest.raises(ValueError, match="unknown blip_kernels backend"):
        bk.use_backend("cuda-magic").__enter__()


def test_backend_environment_variable():
    # Read at import: check it in a fresh interpreter.
    code = "import blip_kernels as bk; print(bk.current_backend('cpu'))"
    env = {**os.environ, "BLIP_KERNELS_BACKEND": "torch"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True, cwd=Path(__file__).parent.parent)
    assert out.stdout.strip() == "reference"
    env["BLIP_KERNELS_BACKEND"] = "no-such-backend"
    bad = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         cwd=Path(__file__).parent.parent)
    assert bad.returncode != 0 and "unknown blip_kernels backend 'no-such-backend'" in bad.stderr


def test_unavailable_backend_named_explicitly_is_an_error(monkeypatch):
    monkeypatch.setattr(backends, "_cache", {})
    monkeypatch.setattr(ref, "unavailable_reason", lambda device: "it was switched off")
    with bk.use_backend("reference"), pytest.raises(
        bk.BackendUnavailableError, match="'reference' cannot run on cpu: it was switched off"
    ):
        bk.quantize(torch.zeros(3), torch.zeros(3, dtype=torch.uint8), 1.0)


def test_cpp_backend_is_built():
    """The native build is part of the install; only BLIP_NO_EXT=1 may skip it."""
    if os.environ.get("BLIP_NO_EXT") == "1":
        assert bk.unavailable_reason("cpp") is not None
    else:
        assert bk.unavailable_reason("cpp") is None
