"""Parameter-isolation baselines (blip/methods/hat.py, packnet.py): HAT and PackNet. State
round-trips, the protection mechanisms, pruning, and tiny trainer runs."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _support import run_killed_then_resumed
from torch import Tensor, nn

from blip.methods import HAT, Method, PackNet, make_method
from blip.models import MLP, MultiHead, ResNet18

CLASSES = (3, 3, 3)


class ConvChain(MultiHead):
    """conv -> ReLU -> conv -> ReLU -> flatten -> fc -> heads."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 5, 3, padding=1)
        self.fc = nn.Linear(5 * 4 * 4, 8)
        self.heads = nn.ModuleList(nn.Linear(8, c) for c in CLASSES)

    def features(self, x: Tensor) -> Tensor:
        h = F.relu(self.conv2(F.relu(self.conv1(x))))
        return F.relu(self.fc(h.flatten(1)))


def _data(task: int, n: int = 48, shape: tuple[int, ...] = (6,)) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(100 + task)
    x = torch.randn(n, *shape, generator=g)
    y = torch.randint(0, CLASSES[task], (n,), generator=g)
    return x, y


def _mlp(seed: int = 0, layers: int = 2) -> MLP:
    torch.manual_seed(seed)
    return MLP(6, hidden=12, classes_per_task=CLASSES, n_hidden_layers=layers)


def _fresh(name: str, model: nn.Module, **hp) -> Method:
    method = make_method(name, model, **hp)
    method.prepare()
    return method


def _train(method: Method, task: int, x: Tensor, y: Tensor, steps: int = 6,
           finish: bool = True, lr: float = 0.1, bs: int = 16) -> None:
    """The trainer's protocol on mini-batches."""
    model = method.model
    method.before_task(task)
    opt = method.make_optimizer(task, lr)
    method.before_epoch(task, 0)
    model.train()
    for s in range(steps):
        i = (s * bs) % len(y)
        loss = method.training_loss(model, x[i:i + bs], y[i:i + bs], task)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        method.after_backward(task)
        opt.step()
        method.after_step(task)
    if finish:
        method.after_task(task, x, y)


@torch.no_grad()
def _eval(method: Method, x: Tensor, task: int) -> Tensor:
    method.model.eval()
    with method.eval_context(task):
        return method.model(x, task)


def _tensors(obj: object) -> list[Tensor]:
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for k in sorted(obj) for t in _tensors(obj[k])]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    return []


HP = {"hat": {"batches_per_epoch": 3}, "packnet": {"seed": 3, "retrain_epochs": 1}}


# -- state round-trip ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["hat", "packnet"])
def test_state_round_trips_through_a_checkpoint(name: str) -> None:
    model = _mlp()
    method = _fresh(name, model, momentum=0.5, **HP[name])
    _train(method, 0, *_data(0))
    _train(method, 1, *_data(1))
    _train(method, 2, *_data(2), steps=2, finish=False)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "method": method.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)

    model2 = _mlp(seed=1)  # different init: everything must come from the checkpoint
    method2 = _fresh(name, model2, momentum=0.5, **HP[name])  # HAT adds model.hat first
    model2.load_state_dict(saved["model"])
    method2.load_state_dict(saved["method"])
    x = _data(2)[0]
    for task in (0, 1, 2):
        assert torch.equal(_eval(method, x, task), _eval(method2, x, task))
    # the restored method keeps working identically: task 2 again, then task 2's end
    for m in (method, method2):
        _train(m, 2, *_data(2), steps=4)
    for (n, p), (_, q) in zip(model.named_parameters(), model2.named_parameters(), strict=True):
        assert torch.equal(p, q), n
    flat, flat2 = _tensors(method.state_dict()), _tensors(method2.state_dict())
    assert len(flat) == len(flat2) > 0
    assert all(torch.equal(a, b) for a, b in zip(flat, flat2, strict=True))
    assert method.state_dict()["tasks_done"] == method2.state_dict()["tasks_done"] == 3


def test_extra_state_bytes_are_the_real_overhead() -> None:
    hat = _fresh("hat", _mlp())
    units = 12 + 12
    assert hat.extra_state_bytes() == 4 * (len(CLASSES) * units + units)  # e_t, cumulative
    pn = _fresh("packnet", _mlp())
    assert pn.extra_state_bytes() == 6 * 12 + 12 * 12  # one uint8 owner per trunk weight


def test_bad_hyperparameters_name_them() -> None:
    for hp, word in [({"s_max": 0.5}, "s_max"), ({"c": -1.0}, "c"), ({"thres_emb": 0}, "thres_emb"),
                     ({"thres_cosh": "x"}, "thres_cosh"), ({"batches_per_epoch": 0},
                                                           "batches_per_epoch")]:
        with pytest.raises(ValueError, match=word):
            make_method("hat", _mlp(), **hp)
    for hp, word in [({"prune": 1.0}, "prune"), ({"prune": -0.1}, "prune"),
                     ({"retrain_epochs": -1}, "retrain_epochs"), ({"retrain_lr": 0},
                                                                  "retrain_lr"),
                     ({"retrain_batch_size": 0}, "retrain_batch_size"),
                     ({"momentum": -1}, "momentum")]:
        with pytest.raises(ValueError, match=word):
            make_method("packnet", _mlp(), **hp)
    with pytest.raises(TypeError, match="unknown hyper-parameters"):
        make_method("hat", _mlp(), smax=400)
    headless = nn.Sequential(nn.Linear(3, 3))
    for name in ("hat", "packnet"):
        with pytest.raises(ValueError, match="heads"):
            make_method(name, headless).prepare()
        method = _fresh(name, _mlp())
        _train(method, 0, *_data(0), steps=1)
        with pytest.raises(ValueError, match="in order"):
            method.before_task(0)  # a finished task cannot be trained again


# -- HAT ------------------------------------------------------------------------------------


def test_hat_cumulative_mask_blocks_updates_to_protected_weights() -> None:
    model = _mlp()
    method: HAT = _fresh("hat", model, batches_per_epoch=3)  # type: ignore[assignment]
    x0, y0 = _data(0)
    _train(method, 0, x0, y0, steps=9)
    assert method.in_src == [None, 0]  # trunk.2's inputs are trunk.0's units (after ReLU)
    cum = [c.clone() for c in method.cum]
    assert all(0 < float(c.mean()) < 1 for c in cum), cum
    assert all(torch.equal(c, m) for c, m in zip(cum, method.mask(0), strict=True))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    out0 = _eval(method, x0, 0)

    # task 1 with a large lr, momentum and weight decay: nothing protected may move
    method.hparams.update(momentum=0.9, weight_decay=0.1)
    _train(method, 1, *_data(1), steps=9, lr=5.0)
    w0, w1 = model.trunk[0].weight, model.trunk[2].weight
    rows = cum[0].bool()
    assert torch.equal(w0[rows], before["trunk.0.weight"][rows])
    assert torch.equal(model.trunk[0].bias[rows], before["trunk.0.bias"][rows])
    both = cum[1].bool()[:, None] & cum[0].bool()[None, :]
    assert torch.equal(w1[both], before["trunk.2.weight"][both])
    assert not torch.equal(w0[~rows], before["trunk.0.weight"][~rows])  # free units trained
    assert not torch.equal(w1[~both], before["trunk.2.weight"][~both])
    assert all(torch.equal(e, before[f"hat.e.0.{i}"]) for i, e in enumerate(method.emb.e[0]))
    assert torch.equal(_eval(method, x0, 0), out0)  # task 0 unchanged at evaluation


def test_hat_masks_binarise_at_s_max() -> None:
    model = _mlp(layers=1)
    # blip's convention: binarised masks, s reaching s_max (the reference's: conventions_b)
    method: HAT = _fresh("hat", model, batches_per_epoch=4,  # type: ignore[assignment]
                         convention="blip")
    x, y = _data(0)
    method.before_task(0)
    opt = method.make_optimizer(0, 0.1)
    scales = []
    for s in range(4):  # one epoch: s rises linearly from 1/s_max to s_max
        loss = method.training_loss(model, x[s * 8:(s + 1) * 8], y[s * 8:(s + 1) * 8], 0)
        scales.append(method._s)
        opt.zero_grad()
        loss.backward()
        method.after_backward(0)
        opt.step()
        method.after_step(0)
    assert scales[0] == pytest.approx(1 / 400) and scales[-1] == pytest.approx(400)
    assert scales == sorted(scales)
    assert float(method.emb.e[0][0].detach().abs().max()) <= 6.0  # clamped to ±thres_emb
    # evaluation: exactly the {0, 1} mask e_0 > 0, i.e. σ(s_max·e_0) rounded
    e = method.emb.e[0][0].detach()
    mask = (e > 0).float()
    assert torch.equal(method.mask(0)[0], mask)
    assert torch.equal(torch.sigmoid(400 * e).round(), mask)
    lin = model.trunk[0]
    expect = model.heads[0](F.relu(F.linear(x, lin.weight, lin.bias) * mask))
    torch.testing.assert_close(_eval(method, x, 0), expect, rtol=0, atol=1e-6)
    # without batches_per_epoch, the epoch length is learned at the next epoch's start
    auto: HAT = _fresh("hat", _mlp(layers=1), convention="blip")  # type: ignore[assignment]
    _train(auto, 0, x, y, steps=5, finish=False, bs=8)
    assert auto.seen_batches is None and auto.scale() == pytest.approx(400)  # until known
    _eval(auto, x, 0)  # evaluating ends no epoch
    assert auto.seen_batches is None and auto._batch == 5
    auto.before_epoch(0, 1)
    assert auto.seen_batches == 5 and auto._batch == 0
    assert auto.scale() == pytest.approx(1 / 400)
    _train(auto, 0, x, y, steps=5, finish=False, bs=8)
    assert auto._s == pytest.approx(400)


def test_hat_input_masks_only_where_the_probe_proves_them() -> None:
    torch.manual_seed(0)
    chain = _fresh("hat", ConvChain())
    _train(chain, 0, *_data(0, shape=(1, 4, 4)), steps=2)
    assert chain.in_src == [None, 0, None]  # conv1 -> conv2 known; flatten -> fc is not
    torch.manual_seed(0)
    res = _fresh("hat", ResNet18((3, 8, 8), CLASSES, width=0.0625))
    _train(res, 0, *_data(0, n=8, shape=(3, 8, 8)), steps=1, bs=8)
    # BatchNorm and residual adds: output-side masks everywhere (conservative)
    assert res.in_src == [None] * len(res.layers)


# -- PackNet --------------------------------------------------------------------------------


def test_packnet_owned_weights_are_bit_identical_after_the_next_task() -> None:
    model = _mlp()
    method: PackNet = _fresh("packnet", model, seed=0)  # type: ignore[assignment]
    _train(method, 0, *_data(0))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    owned = [o == 1 for o in method.owners]
    assert all(0 < float(o.float().mean()) < 1 for o in owned)
    method.hparams.update(momentum=0.9, weight_decay=0.1)
    _train(method, 1, *_data(1), steps=9, lr=5.0)
    for (name, layer), o in zip(method.layers, owned, strict=True):
        assert torch.equal(layer.weight[o], before[f"{name}.weight"][o])
        assert not torch.equal(layer.weight[~o], before[f"{name}.weight"][~o])
        assert torch.equal(layer.bias, before[f"{name}.bias"])  # frozen after task 0


def test_packnet_eval_uses_only_the_tasks_own_and_older_weights() -> None:
    model = _mlp()
    method: PackNet = _fresh("packnet", model, seed=0)  # type: ignore[assignment]
    _train(method, 0, *_data(0))
    _train(method, 1, *_data(1))
    x = _data(2)[0]
    out0, out1 = _eval(method, x, 0), _eval(method, x, 1)
    # what task 0's evaluation computes: the trunk with only task 0's weights
    with torch.no_grad():
        h = x
        for (_, layer), own in zip(method.layers, method.owners, strict=True):
            h = F.relu(F.linear(h, layer.weight * (own == 1), layer.bias))
        torch.testing.assert_close(out0, model.heads[0](h), rtol=0, atol=1e-6)
    weights = {n: m.weight.detach().clone() for n, m in method.layers}
    with torch.no_grad():  # change everything task 0 does not own
        for (_, layer), own in zip(method.layers, method.owners, strict=True):
            layer.weight.add_(torch.randn_like(layer.weight) * (own != 1))
    assert torch.equal(_eval(method, x, 0), out0)
    assert not torch.equal(_eval(method, x, 1), out1)
    with torch.no_grad():
        for n, layer in method.layers:
            layer.weight.copy_(weights[n])
    _eval(method, x, 0)
    assert all(torch.equal(m.weight, weights[n]) for n, m in method.layers)  # restored


def test_packnet_prune_releases_the_intended_fraction() -> None:
    model = _mlp()
    method: PackNet = _fresh("packnet", model, prune=0.6, retrain_epochs=1,
                             seed=0)  # type: ignore[assignment]
    _train(method, 0, *_data(0), finish=False)
    mags = [m.weight.detach().abs().clone() for _, m in method.layers]
    keep = method.release(0)
    for (_, layer), k, mag in zip(method.layers, keep, mags, strict=True):
        n = layer.weight.numel()
        assert int((~k).sum()) == round(0.6 * n)
        assert bool((layer.weight[~k] == 0).all())
        assert float(mag[~k].max()) <= float(mag[k].min())  # the smallest were released
    # over two tasks: each releases 60% of what is free, and owns the rest
    method = _fresh("packnet", _mlp(), prune=0.6, retrain_epochs=1,
                    seed=0)  # type: ignore[assignment]
    _train(method, 0, *_data(0))
    _train(method, 1, *_data(1))
    for (_, layer), own in zip(method.layers, method.owners, strict=True):
        n = layer.weight.numel()
        free0 = round(0.6 * n)
        assert int((own == 1).sum()) == n - free0
        assert int((own == 0).sum()) == round(0.6 * free0)
        assert int((own == 2).sum()) == free0 - round(0.6 * free0)
        assert bool((layer.weight[own == 0] == 0).all())


# -- end to end -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["hat", "packnet"])
def test_trainer_keeps_old_tasks_and_resumes(name: str, pdigits3, tmp_path: Path) -> None:
    from blip.classification.trainer import TrainConfig

    cfg = TrainConfig.from_preset("pdigits", method=name, n_tasks=3, epochs=4, batch_size=64,
                                  threads=1)
    full, resumed = run_killed_then_resumed(cfg, pdigits3, tmp_path)
    saved = json.loads((tmp_path / "full" / "results.json").read_text())
    assert saved["complete"] and saved["acc"] > 0.6, saved["acc_matrix"]
    assert saved["bwt"] >= -0.005, saved["acc_matrix"]  # at most half a point forgotten
    assert resumed["acc_matrix"] == full["acc_matrix"]
