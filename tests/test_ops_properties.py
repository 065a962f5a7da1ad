"""Invariants under arbitrary inputs (hypothesis) and torch.library opcheck."""

from __future__ import annotations

import pytest
import torch
from _support import backend_device_pairs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import blip_kernels as bk

MAX_BIT = 20
# The interpreter runs Triton kernels slowly: properties run on the fast backends.
FAST = [p for p in backend_device_pairs() if p[0] != "triton" or p[1] == "cuda"]
finite = st.floats(-1e3, 1e3, allow_nan=False, width=32)
anything = st.floats(width=32)  # NaN and ±inf included


@pytest.mark.parametrize("pair", FAST, ids=lambda p: f"{p[0]}-{p[1]}")
@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    data=st.data(),
    n=st.integers(1, 64),
    bound=st.floats(1e-3, 10.0),
    steps=st.integers(1, 6),
    momentum=st.sampled_from([0.0, 0.5, 0.9]),
)
def test_weights_stay_in_their_frozen_interval(pair, data, n, bound, steps, momentum):
    name, device = pair
    bound = float(torch.tensor(bound, dtype=torch.float32))  # the kernels' fp32 bound
    bits = torch.tensor(data.draw(st.lists(st.integers(0, MAX_BIT), min_size=n, max_size=n)),
                        dtype=torch.uint8, device=device)
    start = torch.tensor(data.draw(st.lists(finite, min_size=n, max_size=n)), device=device)
    with bk.use_backend(name):
        w = (start / 1e3 * bound).clamp(-bound, bound)
        prev = w.clone()
        bk.sync_(w, prev, bits, bound)  # prev on the grid, as at the end of a task
        buf = torch.zeros(n, device=device)
        for _ in range(steps):
            grad = torch.tensor(data.draw(st.lists(anything, min_size=n, max_size=n)),
                                dtype=torch.float32, device=device)
            lr = data.draw(st.floats(0.0, 10.0))
            bk.constrained_sgd_step_(w, grad, prev, bits, bound, MAX_BIT, lr, buf,
                                     momentum=momentum)
        # prev + clamp(w - prev) is rounded to fp32: allow half an ulp of w.
        radius = bound * torch.pow(0.5, bits.float()) + w.abs() * 2.0**-24
        limit = bound * (1 - 2.0**-MAX_BIT)
        assert torch.isfinite(w).all()
        assert ((w - prev).abs() <= radius).all()
        assert (w.abs() <= limit).all()
        # At the frozen precision w re-quantizes to prev or a grid neighbour: the
        # interval is ±one grid step around prev, as in the authors' clipping.
        q = bk.quantize(w, bits, bound)
        assert (((q - prev).abs() <= radius + q.abs() * 2.0**-23) | (bits == 0)).all()
        # sync then quantize is idempotent
        bk.sync_(w, prev, bits, bound)
        assert torch.equal(bk.quantize(w, bits, bound), w)


@pytest.mark.parametrize("pair", FAST, ids=lambda p: f"{p[0]}-{p[1]}")
@settings(max_examples=40, deadline=None)
@given(values=st.lists(anything, min_size=1, max_size=200), bound=st.floats(1e-3, 10.0))
def test_project_keeps_the_interval_for_any_weight(pair, values, bound):
    name, device = pair
    bound = float(torch.tensor(bound, dtype=torch.float32))
    n = len(values)
    bits = torch.arange(n, device=device).remainder(MAX_BIT + 1).to(torch.uint8)
    with bk.use_backend(name):
        prev = bk.quantize(torch.linspace(-bound, bound, n, device=device), bits, bound)
        w = torch.tensor(values, dtype=torch.float32, device=device)
        bad = (~torch.isfinite(w)).sum().item()
        assert bk.project_(w, prev, bits, bound, MAX_BIT).item() == bad
    assert ((w - prev).abs() <= bound * torch.pow(0.5, bits.float()) + w.abs() * 2.0**-24).all()


# ------------------------------------------------------------------ opcheck


def _opcheck_cases(device: str):
    g = torch.Generator().manual_seed(0)
    n = 37
    w = torch.randn(n, generator=g).to(device) * 0.1
    bits = torch.randint(0, MAX_BIT + 1, (n,), generator=g).to(torch.uint8).to(device)
    prev = torch.randn(n, generator=g).to(device) * 0.1
    grad = torch.randn(n, generator=g).to(device)
    x = torch.randn(4, 3, 6, 6, generator=g).to(device)
    c = torch.randn(4, 5, 3, 3, generator=g).to(device)
    ops = torch.ops.blip
    return [
        (ops.quantize.default, (w.clone().requires_grad_(), bits, 0.3)),
        (ops.project_.default, (w.clone(), prev, bits, 0.3, MAX_BIT)),
        (ops.constrained_sgd_step_.default,
         (w.clone(), grad, prev, bits, torch.zeros(n, device=device), 0.3, MAX_BIT, 0.1, 0.9,
          0.0, True, 1e-4)),
        (ops.constrained_sgd_step_.default,
         (w.clone(), grad, prev, bits, None, 0.3, MAX_BIT, 0.1, 0.0, 0.0, False, 0.0)),
        (ops.constrained_sgd_step_foreach_.default,
         ([w.clone(), w[:5].clone().half()], [grad, grad[:5].half()], [prev, prev[:5]],
          [bits, bits[:5]], [torch.zeros(n, device=device), torch.zeros(5, device=device)],
          [0.3, 1.0], MAX_BIT, 0.1, 0.9, [0.0, 0.2], False, 1e-4)),
        (ops.constrained_sgd_step_foreach_.default,
         ([w.clone()], [grad], [prev], [bits], None, [0.3], MAX_BIT, 0.1, 0.0, [0.0], False,
          0.0)),
        (ops.update_bits_.default,
         (bits.clone(), torch.rand(n, device=device), torch.rand(n, device=device) + 0.1, 1,
          MAX_BIT)),
        (ops.sync_.default, (w.clone(), prev.clone(), bits, 0.3)),
        (ops.fisher_linear_.default,
         (torch.zeros(5, 3, device=device), torch.zeros(5, device=device),
          torch.randn(6, 3, device=device), torch.randn(6, 5, device=device), 0.5)),
        (ops.fisher_linear_.default,
         (torch.zeros(5, 3, device=device), None,
          torch.randn(6, 2, 3, device=device), torch.randn(6, 2, 5, device=device), 0.5)),
        (ops.fisher_conv2d_.default,
         (torch.zeros(5, 3, 2, 2, device=device), torch.zeros(5, device=device), x, c,
          [2, 2], [0, 0], [1, 1], 1, 1.0)),
    ]


@pytest.mark.parametrize("pair", backend_device_pairs(), ids=lambda p: f"{p[0]}-{p[1]}")
def test_opcheck_every_op(pair):
    name, device = pair
    with bk.use_backend(name):
        for op, args in _opcheck_cases(device):
            torch.library.opcheck(op, args)


def test_ops_work_under_torch_compile():
    def step(w, grad, prev, bits):
        bk.constrained_sgd_step_(w, grad, prev, bits, 0.3, MAX_BIT, 0.1)
        return bk.quantize_ste(w, bits, 0.3) * 2

    torch.manual_seed(0)
    w, grad, prev = torch.randn(64) * 0.1, torch.randn(64), torch.randn(64) * 0.1
    bits = torch.randint(0, 8, (64,), dtype=torch.uint8)
    w2 = w.clone()
    eager = step(w, grad, prev, bits)
    compiled = torch.compile(step, backend="aot_eager", fullgraph=False)(w2, grad, prev, bits)
    assert torch.equal(eager, compiled)
    assert torch.equal(w, w2)
