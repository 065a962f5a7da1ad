"""blip.convert keeps tied weights tied and names every module it leaves unprotected."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations

import blip
from blip.nn import QuantLinear


class Tied(nn.Module):
    """Two Linears sharing one weight (own biases), used on different tasks."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.b.weight = self.a.weight
        self.heads = nn.ModuleList([nn.Linear(4, 3), nn.Linear(4, 3)])

    def forward(self, x: torch.Tensor, task: int) -> torch.Tensor:
        return self.heads[task]((self.a if task == 0 else self.b)(x))


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_tied_weight_stays_one_parameter_with_one_state() -> None:
    model = Tied()
    before = _n_params(model)
    blip.convert(model, exclude="heads")
    assert isinstance(model.a, QuantLinear) and isinstance(model.b, QuantLinear)
    assert model.a.weight is model.b.weight
    assert _n_params(model) == before  # 16 + 4 + 4 (+ heads), not 16 more
    # one BLIP state: the first layer holds it, the second has none of its own
    assert model.a.blip_param_names() == ("weight", "bias")
    assert model.b.blip_param_names() == ("bias",)
    assert not hasattr(model.b, "prev_weight") and not hasattr(model.b, "bits_weight")
    state = model.state_dict()
    assert "a.bits_weight" in state and "b.bits_weight" not in state


def test_tied_weight_trains_and_freezes_bits_once() -> None:
    torch.manual_seed(0)
    model = Tied()
    strategy = blip.BLIP(model, F_prior=1e-15)
    x = torch.randn(64, 4)
    y = torch.randint(0, 3, (64,))
    opt = strategy.optimizer(lr=0.1)
    for task in range(2):
        for _ in range(5):
            loss = nn.functional.cross_entropy(model(x, task), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        strategy.end_task(task, (x, y))
    # still tied after the fused steps and the syncs; bits frozen on the shared weight
    assert model.a.weight is model.b.weight
    assert int(model.a.bits_weight.sum()) > 0
    # task 1 used only b: the weight's frozen bits still hold task 0's most significant bits
    w, prev, bits = model.a.weight, model.a.prev_weight, model.a.bits_weight
    r = model.a.weight_bound * torch.pow(0.5, bits.float())
    assert bool(((w - prev).abs() <= r).all())
    assert set(strategy.capacity()["layers"]) == {"a", "b"}


def test_tied_weight_used_twice_in_one_forward_is_refused_at_fisher() -> None:
    model = Tied()
    strategy = blip.BLIP(model)
    x = torch.randn(8, 4)
    with pytest.raises(ValueError, match="sharing its weight"):
        strategy.end_task(0, x, forward=lambda xb: model.heads[0](model.b(model.a(xb))))


def test_unconvertible_layers_named_in_one_warning() -> None:
    model = nn.Sequential(
        nn.Conv1d(2, 2, 3), nn.ConvTranspose2d(2, 2, 3), nn.Conv3d(2, 2, 1),
        nn.LazyLinear(4), parametrizations.weight_norm(nn.Linear(4, 4)), nn.Linear(4, 4),
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        blip.convert(model)
    mine = [w for w in caught if "blip.convert" in str(w.message)]
    assert len(mine) == 1
    msg = str(mine[0].message)
    for name, kind in [("0", "Conv1d"), ("1", "ConvTranspose2d"), ("2", "Conv3d"),
                       ("3", "LazyLinear"), ("4", "ParametrizedLinear")]:
        assert f"{name} ({kind}" in msg
    assert "parametrized" in msg and "lazy" in msg
    assert isinstance(model[5], QuantLinear) and "5 (" not in msg


def test_strict_makes_it_an_error_and_changes_nothing() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.Conv1d(1, 1, 1))
    with pytest.raises(ValueError, match=r"1 \(Conv1d.*strict=True"):
        blip.convert(model, strict=True)
    assert type(model[0]) is nn.Linear
    with pytest.raises(TypeError, match="strict"):
        blip.convert(model, strict="yes")


def test_excluded_and_fully_converted_models_do_not_warn() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        blip.convert(blip.models.MLP(8, hidden=5, classes_per_task=[2, 2]), exclude="heads")
        blip.convert(nn.Sequential(nn.Linear(2, 2), nn.Conv1d(1, 1, 1)), exclude="1")


def test_linear_tied_to_an_unconverted_module_is_left_and_named() -> None:
    class LM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(5, 4)
            self.out = nn.Linear(4, 5, bias=False)
            self.out.weight = self.emb.weight

    model = LM()
    with pytest.warns(UserWarning, match=r"out \(Linear: shares a parameter with emb"):
        blip.convert(model)
    assert type(model.out) is nn.Linear and model.out.weight is model.emb.weight
