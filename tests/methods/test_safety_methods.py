"""Every method checks its hyper-parameters (finite in float32, bools refused, ranges) and
its optimizer's lr; a rejected state load changes nothing (issue 11 findings 6, 7, 8)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from blip.methods import METHODS, make_method
from blip.models import MLP


def _model() -> MLP:
    return MLP(4, 8, [2, 2])


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize(("name", "value"), [
    ("momentum", math.nan), ("momentum", math.inf), ("momentum", True), ("momentum", 1.5),
    ("momentum", None), ("momentum", "0.1"), ("weight_decay", True), ("weight_decay", -1.0),
    ("weight_decay", math.inf), ("weight_decay", 1e39),
])
def test_momentum_and_weight_decay_checked_for_every_method(method: str, name: str,
                                                            value: object) -> None:
    assert len(METHODS) == 12
    with pytest.raises(ValueError, match=rf"method {method!r}: {name} must be"):
        make_method(method, _model(), **{name: value})


@pytest.mark.parametrize(("method", "name"), [
    ("ewc", "lamb"), ("online-ewc", "lamb"), ("mas", "lamb"), ("lwf", "lamb"),
    ("imm-mode", "lamb"), ("si", "c"), ("hat", "s_max"), ("hat", "c"),
    ("packnet", "retrain_lr"), ("blip", "F_prior"),
])
@pytest.mark.parametrize("value", [math.inf, 1e39, True, math.nan])
def test_method_strengths_finite_in_float32(method: str, name: str, value: object) -> None:
    with pytest.raises(ValueError, match=rf"{name} must be"):
        m = make_method(method, _model(), **{name: value})
        m.prepare()  # BLIP checks its own settings when it converts the model


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_optimizer_refuses_lr_1e39(method: str) -> None:
    m = make_method(method, _model())
    m.prepare()
    m.before_task(0)
    with pytest.raises(ValueError, match=r"lr must be a finite number.*float32"):
        m.make_optimizer(0, 1e39)


def test_rejected_method_state_changes_nothing() -> None:
    net = MLP(4, 6, [2, 2])
    ewc = make_method("ewc", net)
    good = {n: torch.ones_like(p) for n, p in net.named_parameters()}
    meta = {"conventions": ewc.conventions(), "train_batch_size": 16}
    ewc.load_state_dict({"fisher": good, "anchor": good, "tasks": 1, **meta})
    bad_anchor = {**good, "trunk.0.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match="anchor"):
        ewc.load_state_dict({"fisher": {n: 2 * v for n, v in good.items()}, "anchor": bad_anchor,
                             "tasks": 2, **meta})
    assert all(torch.equal(v, good[n]) for n, v in ewc.fisher.items()) and ewc.tasks == 1
    with pytest.raises(ValueError, match="non-finite"):
        ewc.load_state_dict({"fisher": {**good, "trunk.0.weight":
                                        torch.full_like(good["trunk.0.weight"], np.inf)},
                             "anchor": good, "tasks": 2, **meta})
