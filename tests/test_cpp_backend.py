"""The ``cpp`` backend (blip_kernels._C) against the reference: bit-exact where the
semantics are exact, fp32 summation-order tolerance for Fisher, and the conformance
vectors. Skipped as a whole when the extension was not built (BLIP_NO_EXT=1)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import blip_kernels as bk
from blip_kernels import cpp_backend, reference

pytestmark = pytest.mark.skipif(
    cpp_backend.unavailable_reason(torch.device("cpu")) is not None,
    reason=str(cpp_backend.unavailable_reason(torch.device("cpu"))),
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SIZES = [1, 7, 1023, 1025, 3333]
MAX_BIT = 20
VECTORS = Path(__file__).parent / "data" / "reference_vectors.npz"


def assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    """Bit-exact equality (NaN matches NaN; -0.0 matches 0.0 as in torch.equal)."""
    assert a.dtype == b.dtype and a.shape == b.shape
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def make_state(n: int, dtype: torch.dtype, seed: int, bound: float = 0.7):
    gen = torch.Generator().manual_seed(seed)
    bits = torch.randint(0, MAX_BIT + 1, (n,), generator=gen, dtype=torch.uint8)
    prev = reference.quantize(torch.randn(n, generator=gen) * bound / 2, bits, bound)
    # Weights near prev (most steps stay inside the interval), some far, some non-finite.
    w = prev + torch.randn(n, generator=gen) * bound * 2.0 ** -bits.float()
    w[:: 11] = torch.randn(w[:: 11].shape, generator=gen) * 3 * bound
    w[5 :: 97] = float("nan")
    w[9 :: 101] = float("inf")
    return w.to(dtype), prev, bits, gen


def run_both(fn_name: str, *args, clone_idx: tuple[int, ...] = (0,)):
    """Run op ``fn_name`` with both backends on clones of the mutated args."""
    outs = []
    for backend in (reference, cpp_backend):
        a = [x.clone() if i in clone_idx and x is not None else x for i, x in enumerate(args)]
        ret = getattr(backend, fn_name)(*a)
        outs.append((ret, [a[i] for i in clone_idx]))
    return outs


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
def test_quantize_exact(dtype: torch.dtype, n: int) -> None:
    w, _, bits, _ = make_state(n, dtype, seed=n)
    for bound in (0.7, 1.0, 6 / math.sqrt(784)):
        assert_same(cpp_backend.quantize(w, bits, bound), reference.quantize(w, bits, bound))


def test_quantize_ties_round_half_to_even() -> None:
    bound = 1.0
    bits = torch.full((6,), 2, dtype=torch.uint8)
    w = torch.tensor([0.125, 0.375, -0.125, -0.375, 0.625, 0.875])  # exact ties at 2 bits
    with bk.use_backend("cpp"):
        q = bk.quantize(w, bits, bound)
    assert_same(q, torch.tensor([0.0, 0.5, 0.0, -0.5, 0.5, 1.0]))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
def test_project_exact(dtype: torch.dtype, n: int) -> None:
    w, prev, bits, _ = make_state(n, dtype, seed=n + 1)
    prev[2 :: 53] = float("nan")  # corrupt state must propagate exactly as in the reference
    (ra, (wa,)), (rb, (wb,)) = run_both("project_", w, prev, bits, 0.7, MAX_BIT)
    assert_same(wb, wa)
    assert rb.dtype == torch.int64 and rb.dim() == 0 and int(rb) == int(ra)
    assert int(rb) > 0 or n < 10


SGD_CONFIGS = [
    # momentum, dampening, nesterov, weight_decay, with buffer
    (0.0, 0.0, False, 0.0, False),
    (0.9, 0.0, False, 0.0, True),
    (0.9, 0.1, False, 5e-4, True),
    (0.8, 0.0, True, 1e-2, True),
    (0.0, 0.0, False, 1e-3, False),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("cfg", SGD_CONFIGS)
def test_sgd_step_exact(dtype: torch.dtype, n: int, cfg: tuple) -> None:
    momentum, dampening, nesterov, wd, with_buf = cfg
    w, prev, bits, gen = make_state(n, dtype, seed=n + 2)
    grad = (torch.randn(n, generator=gen) * 0.5).to(dtype)
    grad[3 :: 29] = float("nan")
    grad[4 :: 31] = float("-inf")
    buf = torch.randn(n, generator=gen) * 0.1 if with_buf else None
    args = (w, grad, prev, bits, buf, 0.7, MAX_BIT, 0.05, momentum, dampening, nesterov, wd)
    (ra, (wa, ba)), (rb, (wb, bb)) = run_both("sgd_step_", *args, clone_idx=(0, 4))
    assert_same(wb, wa)
    if with_buf:
        assert_same(bb, ba)
    assert rb.dtype == torch.int64 and rb.dim() == 0 and int(rb) == int(ra)


def test_sgd_many_steps_via_public_op() -> None:
    """Many fused steps through blip_kernels.ops agree with the reference backend."""
    w0, prev, bits, gen = make_state(4099, torch.float32, seed=7)
    w0 = torch.where(torch.isfinite(w0), w0, prev)
    states = {}
    for name in ("reference", "cpp"):
        w, buf = w0.clone(), torch.zeros_like(w0)
        g = torch.Generator().manual_seed(3)
        with bk.use_backend(name):
            for step in range(20):
                grad = torch.randn(w.shape, generator=g)
                bk.constrained_sgd_step_(w, grad, prev, bits, 0.7, MAX_BIT, lr=0.01,
                                         momentum_buf=buf, momentum=0.9,
                                         dampening=0.0 if step == 0 else 0.1)
        states[name] = (w, buf)
    assert_same(states["cpp"][0], states["reference"][0])
    assert_same(states["cpp"][1], states["reference"][1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
def test_sync_exact(dtype: torch.dtype, n: int) -> None:
    w, prev, bits, _ = make_state(n, dtype, seed=n + 3)
    (_, (wa, pa)), (_, (wb, pb)) = run_both("sync_", w, prev, bits, 0.7, clone_idx=(0, 1))
    assert_same(wb, wa)
    assert_same(pb, pa)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("task", [0, 1, 4])
def test_update_bits_exact(n: int, task: int) -> None:
    gen = torch.Generator().manual_seed(n + task)
    bits = torch.randint(0, MAX_BIT + 1, (n,), generator=gen, dtype=torch.uint8)
    fisher = torch.rand(n, generator=gen) ** 4 * 1e-3
    fisher_old = torch.full((n,), 1e-12) * torch.rand(n, generator=gen)
    # Edge cases: 0/0 (NaN gain), x/0 (+inf gain), zero Fisher, already capped bits.
    fisher[:: 5] = 0.0
    fisher_old[:: 7] = 0.0
    bits[:: 13] = MAX_BIT
    args = (bits, fisher, fisher_old, task, MAX_BIT)
    (_, (ba, fa, oa)), (_, (bb, fb, ob)) = run_both("update_bits_", *args, clone_idx=(0, 1, 2))
    assert_same(bb, ba)
    assert_same(ob, oa)
    assert_same(fb, fa)
    assert int(bb.max()) <= MAX_BIT


def _fisher_tols(dtype: torch.dtype) -> dict:
    return {"rtol": 1e-5, "atol": 0.0} if dtype == torch.float32 else {"rtol": 1e-4, "atol": 0}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(33, 40, 24), (5, 3, 7), (64, 1, 1)])
@pytest.mark.parametrize("bias", [True, False])
def test_fisher_linear_2d(dtype: torch.dtype, shape: tuple, bias: bool) -> None:
    n, fin, fout = shape
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(n, fin, generator=gen).to(dtype)
    c = torch.randn(n, fout, generator=gen).to(dtype)
    outs = []
    for backend in (reference, cpp_backend):
        fw, fb = torch.full((fout, fin), 0.5), torch.full((fout,), 0.25) if bias else None
        backend.fisher_linear_(fw, fb, x, c, 0.3)
        outs.append((fw, fb))
    torch.testing.assert_close(outs[1][0], outs[0][0], **_fisher_tols(dtype))
    if bias:
        torch.testing.assert_close(outs[1][1], outs[0][1], **_fisher_tols(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(9, 5, 13, 6), (1, 1, 1, 1), (17, 12, 70, 33)])
@pytest.mark.parametrize("bias", [True, False])
def test_fisher_linear_3d(dtype: torch.dtype, shape: tuple, bias: bool) -> None:
    n, seq, fin, fout = shape
    gen = torch.Generator().manual_seed(seq)
    x = torch.randn(n, seq, fin, generator=gen).to(dtype)
    c = torch.randn(n, seq, fout, generator=gen).to(dtype)
    outs = []
    for backend in (reference, cpp_backend):
        fw, fb = torch.zeros(fout, fin), torch.zeros(fout) if bias else None
        backend.fisher_linear_(fw, fb, x, c, 1.7)
        outs.append((fw, fb))
    torch.testing.assert_close(outs[1][0], outs[0][0], **_fisher_tols(dtype))
    if bias:
        torch.testing.assert_close(outs[1][1], outs[0][1], **_fisher_tols(dtype))


CONV_CASES = [
    # n, cin, cout, (H, W), k, stride, padding, dilation, groups
    (3, 4, 6, (9, 9), (3, 3), (1, 1), (1, 1), (1, 1), 1),
    (2, 6, 9, (11, 8), (3, 2), (2, 1), (0, 2), (1, 1), 3),
    (5, 4, 4, (10, 10), (3, 3), (1, 2), (2, 2), (2, 3), 4),
    (1, 2, 3, (5, 5), (5, 5), (1, 1), (0, 0), (1, 1), 1),
    (7, 3, 8, (9, 9), (3, 3), (3, 3), (1, 1), (1, 1), 1),
    (9, 8, 16, (6, 7), (1, 1), (1, 1), (0, 0), (1, 1), 2),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("bias", [True, False])
def test_fisher_conv2d(dtype: torch.dtype, case: tuple, bias: bool) -> None:
    n, cin, cout, hw, k, st, pad, dil, groups = case
    gen = torch.Generator().manual_seed(n * 31 + cin)
    x = torch.randn(n, cin, *hw, generator=gen).to(dtype)
    w = torch.randn(cout, cin // groups, *k, generator=gen)
    ho = torch.nn.functional.conv2d(x.float(), w, None, st, pad, dil, groups).shape[2:]
    c = torch.randn(n, cout, *ho, generator=gen).to(dtype)
    outs = []
    for backend in (reference, cpp_backend):
        fw, fb = torch.full(w.shape, 0.1), torch.zeros(cout) if bias else None
        backend.fisher_conv2d_(fw, fb, x, c, st, pad, dil, groups, 0.5)
        outs.append((fw, fb))
    torch.testing.assert_close(outs[1][0], outs[0][0], **_fisher_tols(dtype))
    if bias:
        torch.testing.assert_close(outs[1][1], outs[0][1], **_fisher_tols(dtype))


def test_fisher_conv2d_matches_autograd_per_sample() -> None:
    """Independent check: per-sample gradients from autograd, squared and summed."""
    gen = torch.Generator().manual_seed(0)
    conv = torch.nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=1, groups=2)
    x = torch.randn(5, 4, 8, 8, generator=gen)
    expect = torch.zeros_like(conv.weight)
    cs = []
    for i in range(5):
        out = conv(x[i : i + 1])
        c = torch.randn(out.shape, generator=gen)
        cs.append(c)
        (g,) = torch.autograd.grad(out, conv.weight, c)
        expect += g * g
    fw = torch.zeros_like(conv.weight)
    with bk.use_backend("cpp"):
        bk.fisher_conv2d_(fw, None, x, torch.cat(cs), 2, 1, 1, 2)
    torch.testing.assert_close(fw, expect, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------
# conformance vectors (authors' implementation)


@pytest.fixture(scope="module")
def vec() -> dict:
    with np.load(VECTORS) as data:
        return {k: torch.from_numpy(np.array(data[k])) for k in data.files}


def test_conformance_quantize(vec: dict) -> None:
    with bk.use_backend("cpp"):
        q = bk.quantize(vec["quant_theta"], vec["quant_bits"].to(torch.uint8),
                        float(vec["quant_bound"]))
    assert_same(q, vec["quant_out"])


@pytest.mark.parametrize("t", [0, 1, 3])
def test_conformance_bits(vec: dict, t: int) -> None:
    bits = vec[f"bits_t{t}_before"].to(torch.uint8)
    fisher, fisher_old = vec[f"bits_t{t}_fisher"].clone(), vec[f"bits_t{t}_fisher_old"].clone()
    with bk.use_backend("cpp"):
        bk.update_bits_(bits, fisher, fisher_old, t, int(vec["bits_max_bit"]))
    ok = (bits.long() == vec[f"bits_t{t}_after"]) | vec[f"bits_t{t}_ambiguous"]
    assert bool(ok.all())
    torch.testing.assert_close(fisher_old, vec[f"bits_t{t}_fisher_old_next"], rtol=1e-6, atol=0)
    assert bool((fisher == 0).all())


@pytest.mark.parametrize("kind", ["weight", "bias"])
def test_conformance_project_and_sync(vec: dict, kind: str) -> None:
    if kind == "weight":
        w, prev, bits = vec["clip_weight_in"], vec["clip_prev"], vec["clip_bits"]
        bound = float(vec["clip_bound"])
    else:
        w, prev, bits = vec["clip_bias_in"], vec["clip_bias_prev"], vec["clip_bias_bits"]
        bound = 1.0
    bits = bits.to(torch.uint8)
    max_bit = int(vec["clip_max_bit"])
    w_cpp, w_ref = w.clone(), w.clone()
    with bk.use_backend("cpp"):
        bk.project_(w_cpp, prev, bits, bound, max_bit)
    reference.project_(w_ref, prev, bits, bound, max_bit)
    assert_same(w_cpp, w_ref)
    # The npz's clip_*_out alias sync_*_out (a generator artifact): check the sync.
    new_prev = torch.empty_like(prev)
    with bk.use_backend("cpp"):
        bk.sync_(w_cpp, new_prev, bits, bound)
    assert_same(w_cpp, vec[f"sync_{kind}_out"])
    assert_same(new_prev, w_cpp)


def test_conformance_fisher(vec: dict) -> None:
    fw, fb = torch.zeros_like(vec["fisher_lin_w"]), torch.zeros_like(vec["fisher_lin_b"])
    with bk.use_backend("cpp"):
        bk.fisher_linear_(fw, fb, vec["fisher_lin_x"], vec["fisher_lin_costate"])
    torch.testing.assert_close(fw, vec["fisher_lin_w"], rtol=1e-5, atol=0)
    torch.testing.assert_close(fb, vec["fisher_lin_b"], rtol=1e-5, atol=0)
    for i in range(3):
        _, _, k, st, pad, dil = (int(v) for v in vec[f"fisher_conv{i}_cfg"])
        fw = torch.zeros_like(vec[f"fisher_conv{i}_w"])
        fb = torch.zeros_like(vec[f"fisher_conv{i}_b"])
        with bk.use_backend("cpp"):
            bk.fisher_conv2d_(fw, fb, vec[f"fisher_conv{i}_x"], vec[f"fisher_conv{i}_costate"],
                              st, pad, dil)
        torch.testing.assert_close(fw, vec[f"fisher_conv{i}_w"], rtol=1e-5, atol=0)
        torch.testing.assert_close(fb, vec[f"fisher_conv{i}_b"], rtol=1e-5, atol=0)


def test_unavailable_reason_for_cuda() -> None:
    reason = cpp_backend.unavailable_reason(torch.device("cuda"))
    from blip_kernels import _C  # type: ignore[attr-defined]

    # cpp runs on CUDA only with a CUDA build of _C AND a usable GPU (issue 10 item 6).
    assert (reason is None) == (bool(_C.has_cuda()) and torch.cuda.is_available())
    if _C.has_cuda() and not torch.cuda.is_available():
        assert "torch.cuda.is_available()" in reason


_BASELINE_SCRIPT = """
import torch
from blip_kernels import cpp_backend, reference
g = torch.Generator().manual_seed(0)
n = 40000
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    bits = torch.randint(0, 21, (n,), generator=g, dtype=torch.uint8)
    prev = reference.quantize(torch.randn(n, generator=g) * 0.3, bits, 0.7)
    w = (prev + torch.randn(n, generator=g) * 0.01).to(dtype)
    w[::97] = float("nan")
    grad = torch.randn(n, generator=g).to(dtype)
    grad[::89] = float("inf")
    assert torch.equal(cpp_backend.quantize(w, bits, 0.7).nan_to_num(7),
                       reference.quantize(w, bits, 0.7).nan_to_num(7))
    outs = []
    for be in (reference, cpp_backend):
        a, buf = w.clone(), torch.ones(n)
        cnt = be.sgd_step_(a, grad, prev, bits, buf, 0.7, 20, 0.1, 0.9, 0.1, False, 1e-3)
        cnt2 = be.project_(a, prev, bits, 0.7, 20)
        outs.append((a, buf, int(cnt), int(cnt2)))
    (a, b, c, d), (a2, b2, c2, d2) = outs
    assert torch.equal(a, a2) and torch.equal(b.nan_to_num(7), b2.nan_to_num(7)), dtype
    assert (c, d) == (c2, d2)
print("ok")
"""


def test_baseline_isa_path_matches_reference() -> None:
    """The SSE2 copy of the CPU loops (forced by BLIP_CPU_NO_AVX2=1) is bit-exact too."""
    # The child imports the very blip_kernels this process does (source tree or install).
    path = os.pathsep.join(p for p in sys.path if p)
    env = dict(os.environ, BLIP_CPU_NO_AVX2="1", PYTHONPATH=path)
    out = subprocess.run([sys.executable, "-c", _BASELINE_SCRIPT], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
