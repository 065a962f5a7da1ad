"""Fuzz the raw entry points (``torch.ops.blip.*`` and ``blip_kernels._C``) with hypothesis.

Random shapes, dtypes, layouts, devices (cpu, meta), aliasing and scalar values,
mostly near-valid so both the accepted and the refused paths are exercised. The
calls run in a child interpreter (this file run as a script), so a crash of the
process is a test failure with the signal in the message, not a dead test run.
The child asserts that every refusal is a RuntimeError/ValueError/TypeError with a
message, and that every accepted call on cpp/triton writes exactly what the
reference writes (Fisher: to summation-order tolerance).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import blip_kernels as bk

# Examples per mode: about 10 s each here (2 shared cores, ~40 s in all). Some of
# the calls are accepted (over a third), the rest refused; the child prints the counts.
_MODES = {"reference": 800, "cpp": 800, "cpp-raw": 800, "triton": 250}


@pytest.mark.parametrize("mode", list(_MODES))
def test_raw_entry_points_never_crash(mode):
    name = mode.removesuffix("-raw")
    if bk.unavailable_reason(name, "cpu") is not None:
        pytest.skip(f"{name}: {bk.unavailable_reason(name, 'cpu')}")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    out = subprocess.run([sys.executable, __file__, mode, str(_MODES[mode])], env=env,
                         capture_output=True, text=True, timeout=600,
                         cwd=Path(__file__).parent)
    assert out.returncode >= 0, f"the child died by signal {-out.returncode}\n{out.stderr[-4000:]}"
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert out.stdout.strip().endswith("ok"), out.stdout[-2000:]


# ---------------------------------------------------------------------------
# the child


def _child(mode: str, examples: int) -> None:  # noqa: C901 - one generator per op, kept together
    import math

    import numpy as np
    import torch
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from blip_kernels import _C

    torch.set_num_threads(1)
    ops = torch.ops.blip
    backend = mode.removesuffix("-raw")
    raw = mode.endswith("-raw")
    f32, u8 = torch.float32, torch.uint8
    other_dtypes = [torch.float16, torch.bfloat16, torch.float64, torch.uint8, torch.int64,
                    torch.bool, torch.float32]
    odd_scalars = [0, -1, 1e39, -1e39, math.nan, math.inf, 2**63, 2**31, True, None, "0.1",
                   np.float32(0.5), np.int64(3), 1e-50, 25, 100, 3.4e38]

    @st.composite
    def scalar(draw, good):  # noqa: ANN001, ANN202
        return draw(st.sampled_from(odd_scalars)) if draw(st.integers(0, 7)) == 0 else good

    @st.composite
    def tensor(draw, shape, dtype, device, kind="float"):  # noqa: ANN001, ANN202
        """Usually the asked-for shape/dtype/device, dense; sometimes not."""
        shape = list(shape)
        if draw(st.integers(0, 11)) == 0:
            shape = draw(st.lists(st.integers(0, 6), max_size=3))
        if draw(st.integers(0, 11)) == 0:
            dtype = draw(st.sampled_from(other_dtypes))
        if draw(st.integers(0, 15)) == 0:
            device = "meta" if device == "cpu" else "cpu"
        layout = draw(st.sampled_from(["dense"] * 5 + ["strided", "expanded", "transposed"]))
        seed = draw(st.integers(0, 2**16))
        g = torch.Generator().manual_seed(seed)
        base = list(shape)
        if layout == "strided" and base:
            base[-1] *= 2
        elif layout == "expanded" and base:
            base[0] = min(base[0], 1)
        elif layout == "transposed" and len(base) >= 2:
            base[0], base[1] = base[1], base[0]
        if kind == "bits":
            hi = draw(st.sampled_from([1, 4, 9, 21, 21, 25, 256]))
            t = torch.randint(0, hi, base, generator=g, dtype=torch.int64)
        else:
            t = torch.randn(base, generator=g) * draw(st.sampled_from([0.1, 1.0, 1e20]))
            if t.numel() and draw(st.integers(0, 5)) == 0:
                t.view(-1)[0] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
            if kind == "positive":
                t = t.abs() + 0.1
        t = t.to(dtype) if dtype is not torch.bool else t > 0
        if layout == "strided" and shape:
            t = t[..., ::2]
        elif layout == "expanded" and shape and base[0] == 1:
            t = t.expand(shape)
        elif layout == "transposed" and len(shape) >= 2:
            t = t.transpose(0, 1)
        return t.to(device)

    @st.composite
    def call(draw):  # noqa: ANN202
        """(op name, args, indices of the written arguments)."""
        op = draw(st.sampled_from(["quantize", "project_", "sgd", "foreach", "update_bits_",
                                   "sync_", "fisher_linear_", "fisher_conv2d_"]))
        dev = "cpu"
        shape = draw(st.lists(st.integers(0, 7), max_size=3))
        pdt = draw(st.sampled_from([f32, f32, torch.float16, torch.bfloat16]))
        max_bit = draw(scalar(20))
        bound = draw(scalar(draw(st.sampled_from([0.3, 1.0, 0.05]))))

        def w_state():  # noqa: ANN202
            return (draw(tensor(shape, pdt, dev)), draw(tensor(shape, f32, dev)),
                    draw(tensor(shape, u8, dev, "bits")))

        if op == "quantize":
            w, _, bits = w_state()
            return op, [w, bits, bound], []
        if op in ("project_", "sync_"):
            w, prev, bits = w_state()
            if draw(st.integers(0, 9)) == 0:
                prev = w  # aliasing
            if op == "sync_":
                return op, [w, prev, bits, bound], [0, 1]
            return op, [w, prev, bits, bound, max_bit], [0]
        hp = [draw(scalar(0.1)), draw(scalar(draw(st.sampled_from([0.0, 0.9])))),
              draw(scalar(0.0)), draw(st.booleans()), draw(scalar(0.0))]
        if op == "sgd":
            w, prev, bits = w_state()
            grad = draw(tensor(shape, pdt, dev))
            buf = draw(st.sampled_from([None, "buf", "buf", "w"]))
            buf = w if buf == "w" else None if buf is None else draw(tensor(shape, f32, dev))
            return op, [w, grad, prev, bits, buf, bound, max_bit, *hp], [0, 4]
        if op == "foreach":
            k = draw(st.integers(0, 3))
            states = [w_state() for _ in range(k)]
            ws = [s[0] for s in states]
            grads = [draw(tensor(w.shape, w.dtype, dev)) for w in ws]
            bufs = None if draw(st.booleans()) else [draw(tensor(w.shape, f32, dev)) for w in ws]
            bounds = [draw(scalar(0.3)) for _ in ws]
            damps = [draw(scalar(0.0)) for _ in ws]
            if draw(st.integers(0, 9)) == 0 and ws:  # a list entry too many or missing
                bounds = bounds[:-1]
            lr, mom, _, nest, wd = hp
            return op, [ws, grads, [s[1] for s in states], [s[2] for s in states], bufs, bounds,
                        max_bit, lr, mom, damps, nest, wd], [0, 4]
        if op == "update_bits_":
            bits = draw(tensor(shape, u8, dev, "bits"))
            fisher = draw(tensor(shape, f32, dev, "positive"))
            fisher_old = draw(tensor(shape, f32, dev, "positive"))
            task = draw(scalar(draw(st.integers(0, 5))))
            return op, [bits, fisher, fisher_old, task, max_bit], [0, 1, 2]
        scale = draw(scalar(draw(st.sampled_from([1.0, 0.01]))))
        n, out_f, in_f = draw(st.integers(0, 4)), draw(st.integers(0, 5)), draw(st.integers(0, 5))
        fb = None if draw(st.booleans()) else draw(tensor([out_f], f32, dev))
        if op == "fisher_linear_":
            lead = [n] if draw(st.booleans()) else [n, draw(st.integers(0, 3))]
            x = draw(tensor([*lead, in_f], pdt, dev))
            c = draw(tensor([*lead, out_f], pdt, dev))
            fw = draw(tensor([out_f, in_f], f32, dev))
            return op, [fw, fb, x, c, scale], [0, 1]
        groups = draw(st.sampled_from([1, 1, 2]))
        cin = draw(st.integers(1, 2)) * groups
        out_ch = max(out_f, 1) * groups
        kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
        h, wd_ = draw(st.integers(1, 6)), draw(st.integers(1, 6))
        stride = [draw(st.integers(1, 2)), draw(st.integers(1, 2))]
        pad = [draw(st.integers(0, 1)), draw(st.integers(0, 1))]
        dil = [draw(st.integers(1, 2)), draw(st.integers(1, 2))]
        if draw(st.integers(0, 7)) == 0:
            stride = draw(st.sampled_from([[0, 1], [1], [2**40, 1], [-1, 1]]))
        ho = (h + 2 * pad[0] - dil[0] * (kh - 1) - 1) // max(stride[0], 1) + 1
        wo = (wd_ + 2 * pad[1] - dil[1] * (kw - 1) - 1) // max(stride[-1], 1) + 1
        x = draw(tensor([n, cin, h, wd_], pdt, dev))
        c = draw(tensor([n, out_ch, max(ho, 0), max(wo, 0)], pdt, dev))
        fw = draw(tensor([out_ch, cin // groups, kh, kw], f32, dev))
        fb = None if fb is None else draw(tensor([out_ch], f32, dev))
        return op, [fw, fb, x, c, stride, pad, dil, groups, scale], [0, 1]

    op_names = {"quantize": "quantize", "project_": "project_", "sgd": "constrained_sgd_step_",
                "foreach": "constrained_sgd_step_foreach_", "update_bits_": "update_bits_",
                "sync_": "sync_", "fisher_linear_": "fisher_linear_",
                "fisher_conv2d_": "fisher_conv2d_"}
    c_names = {**op_names, "sgd": "sgd_step_", "foreach": "sgd_step_foreach_"}

    def clone(a):  # noqa: ANN001, ANN202
        if isinstance(a, torch.Tensor):
            return a.clone()
        if isinstance(a, list):
            return [clone(x) for x in a]
        return a

    def tensors(a):  # noqa: ANN001, ANN202
        if isinstance(a, torch.Tensor):
            return [a]
        if isinstance(a, list):
            return [t for x in a for t in tensors(x)]
        return []

    def same(a, b, fisher, scale=1.0):  # noqa: ANN001, ANN202
        if a.dtype.is_floating_point:
            if fisher:
                # Past fp32's range the result depends on where the sum overflows: the
                # reference's inf against cpp's 4.5e36 at scale 0.01, or inf against the
                # interpreter's NaN (inf - inf) for a per-sample gradient past 3.4e38. Both
                # must overflow at the same elements (inf, NaN or beyond scale * fp32 max);
                # the rest agree to summation-order tolerance.
                a, b = a.float(), b.float()
                limit = torch.finfo(torch.float32).max * max(abs(float(scale)), 1e-30)

                def past(t, lim):  # noqa: ANN001, ANN202
                    return ~t.isfinite() | (t.abs() >= lim)

                over = past(a, limit) | past(b, limit)  # (the other then within 0.1% of it)
                if not (past(a, 0.999 * limit)[over] & past(b, 0.999 * limit)[over]).all():
                    return False
                return torch.allclose(a[~over], b[~over], rtol=1e-4, atol=1e-30)
            a, b = a.float().nan_to_num(7.0, 8e38, -8e38), b.float().nan_to_num(7.0, 8e38, -8e38)
        return torch.equal(a, b)

    def run(op, args):  # noqa: ANN001, ANN202
        fn = getattr(_C, c_names[op]) if raw else getattr(ops, op_names[op])
        with bk.use_backend(backend):
            return fn(*args)

    counts: dict[str, int] = {"accepted": 0, "refused": 0}

    @settings(max_examples=examples, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(call())
    def fuzz(case) -> None:  # noqa: ANN001
        op, args, written = case
        ref_args = clone(args)
        try:
            result = run(op, args)
        except (RuntimeError, ValueError, TypeError) as exc:
            assert str(exc).strip(), f"{op}: {type(exc).__name__} without a message"
            counts["refused"] += 1
            return
        counts["accepted"] += 1
        # Accepted: the reference, given the same inputs, must write the same values.
        if backend == "reference" or any(t.device.type == "meta" for t in tensors(args)):
            return
        try:
            with bk.use_backend("reference"):
                expected = getattr(ops, op_names[op])(*ref_args)
        except ValueError as exc:
            # _C leaves the data-dependent check (bits <= max_bit) to blip_kernels.ops
            if raw and "must be <= max_bit" in str(exc):
                return
            raise AssertionError(f"{op}: accepted by {mode}, refused by reference: {exc}") from exc
        fisher = op.startswith("fisher")
        for i in written:
            for got, want in zip(tensors(args[i]), tensors(ref_args[i]), strict=True):
                assert same(got, want, fisher, args[-1] if fisher else 1.0), \
                    f"{op}: argument {i} differs from the reference"
        if isinstance(result, torch.Tensor):
            assert same(result, expected, False), f"{op}: result differs from the reference"

    fuzz()
    print(counts)
    print("ok")


if __name__ == "__main__":
    os.environ.setdefault("TRITON_INTERPRET", "1")
    _child(sys.argv[1], int(sys.argv[2]))
