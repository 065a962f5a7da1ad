"""Memory safety of the optimizer and atomic layer/model loads (issue 11 findings 3, 6, 8):
ConstrainedSGD re-checks its buffers every step and takes only float32-finite settings."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import blip
from blip.methods import make_method
from blip.models import MLP
from blip.optim import ConstrainedSGD

ROOT = Path(__file__).resolve().parents[2]


# -- ConstrainedSGD re-checks every step ----------------------------------------------------


def test_replaced_weight_data_is_a_clear_error_not_a_crash() -> None:
    # In a subprocess: before the fix this step wrote 16M floats past 4x4 buffers (SIGSEGV).
    script = textwrap.dedent("""
        import torch, blip
        from blip.optim import ConstrainedSGD
        model = blip.convert(torch.nn.Sequential(torch.nn.Linear(4, 4)))
        opt = ConstrainedSGD(model, 0.1, momentum=0.9)
        model(torch.randn(2, 4)).sum().backward()
        opt.step()
        layer = model[0]
        layer.weight.data = torch.zeros(4, 4_000_000)
        layer.weight.grad = torch.ones(4, 4_000_000)
        try:
            opt.step()
        except ValueError as e:
            print("ERROR:", e)
        else:
            print("NO ERROR")
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={"PYTHONPATH": str(ROOT), "PATH": ""})
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    assert "ERROR:" in proc.stdout and "'0.weight'" in proc.stdout, proc.stdout
    assert "(4, 4000000)" in proc.stdout and "(4, 4)" in proc.stdout


def test_swapped_buffers_are_rechecked() -> None:
    model = blip.convert(nn.Sequential(nn.Linear(3, 2)))
    opt = ConstrainedSGD(model, 0.1)
    model(torch.randn(2, 3)).sum().backward()
    opt.step()
    layer = model[0]
    layer.bits_weight = torch.zeros(5, dtype=torch.uint8)  # a wrong-sized buffer
    with pytest.raises(ValueError, match=r"parameter '0.weight'.*\(2, 3\).*\(5,\)"):
        opt.step()
    layer.bits_weight = torch.full((2, 3), 200, dtype=torch.uint8)  # right size, bad values
    with pytest.raises((ValueError, RuntimeError), match="max_bit|bits"):
        opt.step()


# -- atomic state loads --------------------------------------------------------------------


def test_rejected_layer_load_leaves_the_layer_unchanged() -> None:
    layer = blip.QuantLinear(4, 3)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    sd = {k: v.clone() for k, v in before.items()}
    sd["weight"] += 1.0
    sd["bits_weight"][0, 0] = 200  # > max_bit
    with pytest.raises(ValueError, match=r"bits_weight holds values 0..200"):
        layer.load_state_dict(sd)
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k]), k
    sd = {k: v.clone() for k, v in before.items()}
    sd["prev_weight"][1, 1] = float("nan")
    with pytest.raises(ValueError, match="prev_weight holds 1 values that are not finite"):
        layer.load_state_dict(sd)


def test_rejected_blip_state_leaves_the_whole_model_unchanged() -> None:
    net = MLP(4, 6, [2, 2], n_hidden_layers=2)
    method = make_method("blip", net)
    method.prepare()
    strategy = method.strategy
    before = {k: v.clone() for k, v in net.state_dict().items()}
    state = strategy.state_dict()
    bad = {k: v.clone() for k, v in state["model"].items()}
    first, last = "trunk.0.bits_weight", "trunk.2.bits_weight"
    bad[first][:] = 3  # valid, and loaded first ...
    bad[last] = torch.zeros(1, 1, dtype=torch.uint8)  # ... then a wrong shape
    with pytest.raises(RuntimeError, match="size mismatch"):
        strategy.load_state_dict({**state, "model": bad, "tasks_seen": 5})
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert strategy.tasks_seen == 0


def _model() -> MLP:
    return MLP(4, 8, [2, 2])


@pytest.mark.parametrize("value", [1e39, math.inf, -0.1, True])
def test_constrained_sgd_lr_finite_in_float32(value: object) -> None:
    m = make_method("blip", _model())
    net = m.prepare()
    with pytest.raises(ValueError, match=r"lr must be a finite number"):
        ConstrainedSGD(net, value)


def test_optimizer_accepts_numpy_numbers() -> None:
    net = make_method("blip", _model()).prepare()
    opt = ConstrainedSGD(net, np.float32(0.1), momentum=np.float64(0.5))
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)
    net(torch.randn(2, 4), 0).sum().backward()
    opt.step()  # the fused step takes them too
