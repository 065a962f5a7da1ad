"""Safe by default, kernel side (issue 11): every entry point checks before it touches memory.

Crash-prone calls run in a child interpreter, so a SIGSEGV fails the test instead of
killing the test run. The rest runs on every backend (the ``backend`` fixture).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.autograd.forward_ad as fwad

import blip_kernels as bk

U8 = torch.uint8
MAX_BIT = 20


def run_child(code: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter that imports this very blip_kernels."""
    path = os.pathsep.join(p for p in sys.path if p)
    env = dict(os.environ, PYTHONPATH=path)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env,
                          capture_output=True, text=True, timeout=timeout)


def assert_child_ok(out: subprocess.CompletedProcess) -> None:
    # A negative return code is death by a signal (-11: SIGSEGV).
    assert out.returncode == 0, f"rc={out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    assert out.stdout.strip().endswith("ok"), out.stdout[-3000:]


# Each line is one call that read or wrote out of bounds (or shifted by 100) before the
# checks; each must now raise a clean exception whose message contains the given text.
_CRASH_CASES = r'''
import torch, blip_kernels
from blip_kernels import _C
u8 = torch.uint8
big = torch.zeros(100_000_000)
one, one8 = torch.zeros(1), torch.zeros(1, dtype=u8)
n10, b10 = torch.zeros(10), torch.zeros(10, dtype=u8)
cases = {
    "prev has shape": [
        lambda: torch.ops.blip.project_(big, one, one8, 1.0, 20),
        lambda: _C.project_(big, one, one8, 1.0, 20),
        lambda: torch.ops.blip.sync_(big, one, one8, 1.0),
        lambda: _C.sync_(big, one, one8, 1.0),
        lambda: _C.sgd_step_(big, big, one, one8, None, 1.0, 20, 0.1, 0.0, 0.0, False, 0.0),
    ],
    "bits has shape": [
        lambda: torch.ops.blip.quantize(big, one8, 1.0),
        lambda: _C.quantize(big, one8, 1.0),
    ],
    "fisher has shape": [
        lambda: _C.update_bits_(one8, big, big, 0, 20),
    ],
    "prevs[0] has shape": [
        lambda: torch.ops.blip.constrained_sgd_step_foreach_(
            [big], [big], [one], [one8], None, [1.0], 20, 0.1, 0.0, [0.0], False, 0.0),
        lambda: _C.sgd_step_foreach_([big], [big], [one], [one8], None, [1.0], 20, 0.1, 0.0,
                                     [0.0], False, 0.0),
    ],
    "max_bit must be": [
        lambda: torch.ops.blip.project_(n10, n10.clone(), b10, 1.0, 100),
        lambda: _C.project_(n10, n10.clone(), b10, 1.0, 100),
        lambda: _C.update_bits_(b10, n10, n10.clone(), 0, 100),
    ],
    "fisher_w has shape": [
        lambda: torch.ops.blip.fisher_linear_(torch.zeros(2, 2), None, torch.randn(3, 4, 500),
                                              torch.randn(3, 4, 600), 1.0),
        lambda: _C.fisher_linear_(torch.zeros(2, 2), None, torch.randn(3, 4, 500),
                                  torch.randn(3, 4, 600), 1.0),
    ],
    "grad_out has shape": [
        lambda: _C.fisher_conv2d_(torch.zeros(2, 3, 3, 3), None, torch.randn(1, 3, 8, 8),
                                  torch.randn(1, 2, 60, 60), [1, 1], [0, 0], [1, 1], 1, 1.0),
    ],
    "padding": [
        lambda: _C.fisher_conv2d_(torch.zeros(2, 3, 3, 3), None, torch.randn(1, 3, 8, 8),
                                  torch.randn(1, 2, 6, 6), [1, 1], [2**62, 0], [1, 1], 1, 1.0),
    ],
    "must be contiguous": [
        lambda: _C.project_(n10, torch.zeros(1).expand(10), b10, 1.0, 20),
    ],
    "kernel; it must be at least 1x1": [
        lambda: torch.ops.blip.fisher_conv2d_(torch.zeros(2, 3, 0, 2), None,
                                              torch.randn(1, 3, 4, 4), torch.randn(1, 2, 5, 3),
                                              [1, 1], [0, 0], [1, 1], 1, 1.0),
        lambda: _C.fisher_conv2d_(torch.zeros(2, 3, 0, 2), None, torch.randn(1, 3, 4, 4),
                                  torch.randn(1, 2, 5, 3), [1, 1], [0, 0], [1, 1], 1, 1.0),
    ],
    "momentum_buf is required": [
        lambda: _C.sgd_step_(n10, n10.clone(), n10.clone(), b10, None, 1.0, 20, 0.1, 0.9, 0.0,
                             False, 0.0),
    ],
    "share memory": [
        lambda: _C.sgd_step_(n10, n10.clone(), n10.clone(), b10, n10, 1.0, 20, 0.1, 0.9, 0.0,
                             False, 0.0),
    ],
}
for backend in ("cpp", "reference"):
    with blip_kernels.use_backend(backend):
        for text, calls in cases.items():
            for i, call in enumerate(calls):
                try:
                    call()
                except (ValueError, TypeError, RuntimeError) as exc:
                    assert text in str(exc), (backend, text, i, str(exc))
                else:
                    raise AssertionError(f"{backend}: {text} case {i} was accepted")
print("ok")
'''


def test_raw_entry_points_refuse_out_of_bounds_calls_in_a_child():
    assert_child_ok(run_child(_CRASH_CASES))


_REPLACED_WEIGHT = """
import torch, blip, blip_kernels
from blip.nn import QuantLinear
from blip.optim import ConstrainedSGD
layer = QuantLinear(4, 4)
opt = ConstrainedSGD(layer, lr=0.1)
layer(torch.randn(2, 4)).sum().backward()
opt.step()
layer.weight.data = torch.zeros(4, 4_000_000)  # prev/bits are still 4x4
layer.weight.grad = torch.ones(4, 4_000_000)
try:
    with blip_kernels.use_backend("cpp"):
        opt.step()
except (ValueError, RuntimeError) as exc:
    assert "shape" in str(exc), exc
else:
    raise AssertionError("the step accepted a weight that no longer matches prev/bits")
print("ok")
"""


def test_optimizer_step_after_the_weight_was_replaced_does_not_crash():
    """Finding 3: the step skips its Python checks after the first one; _C still checks."""
    if bk.unavailable_reason("cpp") is not None:
        pytest.skip("needs the native extension")
    assert_child_ok(run_child(_REPLACED_WEIGHT))


def test_validate_false_still_checked_in_cpp():
    """The optimizer's hot loop skips the Python checks; _C checks shapes itself."""
    w, grad = torch.zeros(4, 4_000), torch.zeros(4, 4_000)
    prev, bits = torch.zeros(4, 4), torch.zeros(4, 4, dtype=U8)
    with bk.use_backend("cpp"), pytest.raises(ValueError, match=r"prevs\[0\] has shape"):
        bk.constrained_sgd_step_foreach_([w], [grad], [prev], [bits], [1.0], MAX_BIT, 0.1,
                                         validate=False)


# ------------------------------------------------------- autograd sees the writes


def _state(n: int, device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    bits = torch.randint(0, 8, (n,), generator=g, dtype=U8).to(device)
    prev = (torch.randn(n, generator=g) * 0.1).to(device)
    return prev + 0.01, prev, bits


def _writers(device: str) -> dict:
    """op name -> (tensors it writes, a call that runs it)."""
    w, prev, bits = _state(12, device)
    grad, buf = torch.randn(12, device=device), torch.zeros(12, device=device)
    fisher, fisher_old = torch.rand(12, device=device), torch.rand(12, device=device) + 0.1
    fw, fb = torch.zeros(3, 4, device=device), torch.zeros(3, device=device)
    x, c = torch.randn(5, 4, device=device), torch.randn(5, 3, device=device)
    cw, cb = torch.zeros(2, 3, 2, 2, device=device), torch.zeros(2, device=device)
    cx, cc = torch.randn(2, 3, 4, 4, device=device), torch.randn(2, 2, 3, 3, device=device)
    w2, prev2, bits2 = _state(7, device)
    return {
        "project_": ([w], lambda: bk.project_(w, prev, bits, 0.3, MAX_BIT)),
        "sgd": ([w, buf], lambda: bk.constrained_sgd_step_(
            w, grad, prev, bits, 0.3, MAX_BIT, 0.1, buf, momentum=0.9)),
        "foreach": ([w, w2], lambda: bk.constrained_sgd_step_foreach_(
            [w, w2], [grad, torch.randn(7, device=device)], [prev, prev2], [bits, bits2],
            [0.3, 0.3], MAX_BIT, 0.1)),
        "sync_": ([w, prev], lambda: bk.sync_(w, prev, bits, 0.3)),
        "update_bits_": ([bits, fisher, fisher_old],
                         lambda: bk.update_bits_(bits, fisher, fisher_old, 0, MAX_BIT)),
        "fisher_linear_": ([fw, fb], lambda: bk.fisher_linear_(fw, fb, x, c)),
        "fisher_conv2d_": ([cw, cb], lambda: bk.fisher_conv2d_(cw, cb, cx, cc)),
    }


@pytest.mark.parametrize("op", ["project_", "sgd", "foreach", "sync_", "update_bits_",
                                "fisher_linear_", "fisher_conv2d_"])
def test_inplace_ops_bump_the_version_counter(backend, op):
    written, call = _writers(backend)[op]
    before = [t._version for t in written]
    call()
    assert all(t._version > v for t, v in zip(written, before, strict=True)), op


@pytest.mark.parametrize("op", ["project_", "sgd", "foreach"])
def test_backward_through_a_weight_written_in_place_raises(backend, op):
    """y=(w*x).sum(); project_(w); y.backward() must not use the new w for x.grad."""
    w = torch.randn(12, device=backend).mul_(0.1).requires_grad_()
    x = torch.randn(12, device=backend, requires_grad=True)
    y = (w * x).sum()
    _, prev, bits = _state(12, backend)
    with torch.no_grad():
        if op == "project_":
            bk.project_(w, prev, bits, 0.3, MAX_BIT)
        elif op == "sgd":
            bk.constrained_sgd_step_(w, torch.ones_like(w), prev, bits, 0.3, MAX_BIT, 0.1)
        else:
            bk.constrained_sgd_step_foreach_([w], [torch.ones_like(w)], [prev], [bits], [0.3],
                                             MAX_BIT, 0.1, validate=False)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


@pytest.mark.parametrize("op", ["project_", "sgd", "foreach", "sync_", "update_bits_",
                                "fisher_linear_", "fisher_conv2d_"])
def test_inference_tensors_refused_outside_inference_mode(backend, op):
    with torch.inference_mode():
        written, call = _writers(backend)[op]
    snapshot = [t.clone() for t in written]
    with pytest.raises(RuntimeError, match="inference tensor"):
        call()
    assert all(torch.equal(a, b) for a, b in zip(written, snapshot, strict=True)), "wrote"
    with torch.inference_mode():
        call()  # inside inference mode they are ordinary in-place targets


# ------------------------------------------------- every backend, the same answer


def test_momentum_buf_aliasing_w_or_prev_is_refused(backend):
    w, prev, bits = _state(12, backend)
    grad = torch.randn(12, device=backend)
    for alias, name in ((w, "w"), (prev, "prev"), (grad, "grad")):
        before = w.clone()
        with pytest.raises(ValueError, match=f"{name} and momentum_buf share memory|"
                                             f"momentum_buf and {name} share memory"):
            bk.constrained_sgd_step_(w, grad, prev, bits, 0.3, MAX_BIT, 0.1, alias, momentum=0.9)
        assert torch.equal(w, before)
    with pytest.raises(ValueError, match=r"ws\[0\] and momentum_bufs\[0\] share memory"):
        bk.constrained_sgd_step_foreach_([w], [grad], [prev], [bits], [0.3], MAX_BIT, 0.1, [w],
                                         momentum=0.9)
    with pytest.raises(ValueError, match="w and prev share memory"):
        bk.project_(w, w, bits, 0.3, MAX_BIT)
    with pytest.raises(ValueError, match="share memory"):  # a shifted view overlaps too
        flat = torch.zeros(20, device=backend)
        bk.sync_(flat[:12], flat[4:16], bits, 0.3)


def test_task_out_of_range_is_refused(backend):
    bits = torch.zeros(3, dtype=U8, device=backend)
    f, fo = torch.zeros(3, device=backend), torch.ones(3, device=backend)
    for task in (2**63, 2**24, -1, True, 1.0):
        with pytest.raises(ValueError, match="task must be an int in 0..16777214"):
            bk.update_bits_(bits, f, fo, task, MAX_BIT)
    bk.update_bits_(bits, f, fo, bk.ops.MAX_TASK, MAX_BIT)
    bk.update_bits_(bits, f, fo, np.int64(3), MAX_BIT)


def test_conv_geometry_types(backend):
    fw = torch.zeros(2, 3, 3, 3, device=backend)
    x, c = torch.randn(1, 3, 8, 8, device=backend), torch.randn(1, 2, 6, 6, device=backend)
    for bad in (True, (1, False), 1.0, "1", (1, 1, 1)):
        with pytest.raises(ValueError, match="stride must be an int or a pair of ints"):
            bk.fisher_conv2d_(fw, None, x, c, stride=bad)
    with pytest.raises(ValueError, match="padding must be >= 0"):
        bk.fisher_conv2d_(fw, None, x, c, padding=-1)
    with pytest.raises(ValueError, match="dilation must be positive"):
        bk.fisher_conv2d_(fw, None, x, c, dilation=(1, 2**40))
    ref = fw.clone()
    bk.fisher_conv2d_(ref, None, x, c, stride=1, padding=0)
    bk.fisher_conv2d_(fw, None, x, c, stride=np.int64(1), padding=(np.int32(0), 0))
    assert torch.equal(fw, ref)  # numpy ints are ints


def test_forward_mode_ad_through_quantize_ste_passes_the_tangent(backend):
    w = torch.randn(9, device=backend) * 0.3
    bits = torch.randint(0, 6, (9,), dtype=U8).to(backend)
    tangent = torch.randn(9, device=backend)
    with fwad.dual_level():
        out = bk.quantize_ste(fwad.make_dual(w, tangent), bits, 0.5)
        primal, t = fwad.unpack_dual(out)
        assert t is not None and torch.equal(t, tangent)
        assert torch.equal(primal, bk.quantize(w, bits, 0.5))
        # the non-STE quantize has no derivative
        assert fwad.unpack_dual(bk.quantize(fwad.make_dual(w, tangent), bits, 0.5)).tangent is None
    out, t = torch.func.jvp(lambda v: bk.quantize_ste(v, bits, 0.5), (w,), (tangent,))
    assert torch.equal(t, tangent)


def test_values_that_overflow_float32_are_refused(backend):
    w, prev, bits = _state(8, backend)
    grad = torch.randn(8, device=backend)
    with pytest.raises(ValueError, match=r"bound must be a positive finite number \(finite in "
                                         r"float32\); got 1e\+39"):
        bk.quantize(w, bits, 1e39)
    with pytest.raises(ValueError, match="bound must be a positive"):
        bk.quantize(w, bits, 1e-50)  # rounds to 0 in fp32
    with pytest.raises(ValueError, match="lr must be a finite number >= 0 .*1e\\+39"):
        bk.constrained_sgd_step_(w, grad, prev, bits, 0.3, MAX_BIT, 1e39)
    with pytest.raises(ValueError, match="weight_decay must be a finite number"):
        bk.constrained_sgd_step_(w, grad, prev, bits, 0.3, MAX_BIT, 0.1, weight_decay=4e38)
    with pytest.raises(ValueError, match="scale must be a finite number >= 0 .*1e\\+39"):
        bk.fisher_linear_(torch.zeros(3, 4, device=backend), None,
                          torch.ones(5, 4, device=backend), torch.ones(5, 3, device=backend),
                          1e39)
    with pytest.raises(ValueError, match="scale must be a finite number"):
        torch.ops.blip.fisher_conv2d_(
            torch.zeros(2, 3, 2, 2, device=backend), None, torch.ones(1, 3, 4, 4, device=backend),
            torch.ones(1, 2, 3, 3, device=backend), [1, 1], [0, 0], [1, 1], 1, 1e39)
    # the largest fp32 value itself is fine
    bk.quantize(w, bits, float(torch.finfo(torch.float32).max))


def test_error_texts_name_the_argument():
    w, prev, bits = _state(8, "cpu")
    grad = torch.randn(8)
    with pytest.raises(TypeError, match=r"lr must be a number; got '0.1' \(str\)"):
        bk.constrained_sgd_step_(w, grad, prev, bits, 0.3, MAX_BIT, "0.1")
    with pytest.raises(TypeError, match=r"momentum must be a number; got None"):
        bk.constrained_sgd_step_(w, grad, prev, bits, 0.3, MAX_BIT, 0.1, momentum=None)
    with pytest.raises(TypeError, match=r"dampenings\[1\] must be a number; got None"):
        bk.constrained_sgd_step_foreach_([w, w.clone()], [grad, grad], [prev, prev],
                                         [bits, bits], [0.3, 0.3], MAX_BIT, 0.1,
                                         dampenings=[0.0, None])
    with pytest.raises(TypeError, match="nesterov must be a bool"):
        bk.constrained_sgd_step_(w, grad, prev, bits, 0.3, MAX_BIT, 0.1, nesterov="yes")
    with pytest.raises(TypeError, match=r"bound must be a number; got True"):
        bk.quantize(w, bits, True)
    with pytest.raises(TypeError, match="backend name must be a str"):
        bk.use_backend(None).__enter__()
    with pytest.raises(TypeError, match="value_checks"):
        bk.value_checks(None).__enter__()
    with pytest.raises(TypeError, match="w must be a dense"):
        bk.quantize(torch.zeros(8).to_sparse(), bits, 0.3)
    # numpy scalars are numbers: an np.float32 bound is a positive bound
    assert torch.equal(bk.quantize(w, bits, np.float32(0.5)), bk.quantize(w, bits, 0.5))
    a, b = w.clone(), w.clone()
    bk.constrained_sgd_step_(a, grad, prev, bits, np.float64(0.3), np.int64(MAX_BIT),
                             np.float32(0.1))
    bk.constrained_sgd_step_(b, grad, prev, bits, 0.3, MAX_BIT, float(np.float32(0.1)))
    assert torch.equal(a, b)


def test_meta_tensors_propagate_shapes_and_mixed_devices_name_the_argument():
    m = torch.device("meta")
    w, prev = torch.zeros(4, 5, device=m), torch.zeros(4, 5, device=m)
    bits = torch.zeros(4, 5, dtype=U8, device=m)
    for name in bk.backends.NAMES[:2]:
        with bk.use_backend(name):
            out = bk.quantize(w, bits, 1.0)
            assert out.device == m and out.shape == (4, 5)
            assert bk.project_(w, prev, bits, 1.0, MAX_BIT).device == m
            assert torch.ops.blip.project_(w, prev, bits, 1.0, MAX_BIT).device == m
    with pytest.raises(ValueError, match="bits is on cpu; expected meta"):
        bk.quantize(w, torch.zeros(4, 5, dtype=U8), 1.0)
    with pytest.raises(ValueError, match="prev has shape"):
        torch.ops.blip.project_(w, prev[:1], bits, 1.0, MAX_BIT)


def test_value_checks_apply_to_the_raw_ops():
    w, prev, bits = _state(8, "cpu")
    high = torch.full_like(bits, 30)
    with pytest.raises(ValueError, match="bits must be <= max_bit=20"):
        torch.ops.blip.project_(w, prev, high, 0.3, MAX_BIT)
    with pytest.raises(ValueError, match="bits must be <= max_bit=24"):
        torch.ops.blip.quantize(w, high, 0.3)
    with bk.value_checks(False):
        torch.ops.blip.project_(w, prev, high, 0.3, MAX_BIT)


def test_fisher_with_a_zero_scale_adds_nothing(backend):
    """Found by the fuzz test: 0 * an overflowed square was NaN on one backend only."""
    fw, fb = torch.full((1, 1), 0.25, device=backend), torch.full((1,), 0.5, device=backend)
    x, c = torch.ones(1, 1, device=backend), torch.full((1, 1), 1.5e20, device=backend)
    for scale in (0.0, 1e-50):  # 1e-50 is 0 in fp32
        bk.fisher_linear_(fw, fb, x, c, scale)
        bk.fisher_linear_(fw, fb, x[:, None], c[:, None], scale)  # the per-sample path
        bk.fisher_conv2d_(fw[:, :, None, None], fb, x[:, :, None, None], c[:, :, None, None],
                          scale=scale)
    assert fw.item() == 0.25 and fb.item() == 0.5
    bk.fisher_linear_(fw, fb, x, c, 1.0)
    assert fw.item() == float("inf")  # a real overflow still shows
