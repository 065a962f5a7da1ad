"""Each quadratic-penalty method against a direct transcription of its reference's formulas
(the method's docstring names the reference): importances, their accumulation over tasks,
the anchor and the penalty, on a tiny fixed model and batch. Written from the references'
definitions, not their code; each test fails with the convention these methods had before
(BLIP's per-sample true Fisher, summed EWC Fishers, SI's clip at zero, per-sample MAS)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from blip.methods import Method, make_method
from blip.models import MLP

CLASSES = (3, 4)
TRAIN_BATCH = 8  # the training batch size the methods observe (the references' loader's)
RTOL = 1e-5


def _model(seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    return MLP(5, hidden=7, classes_per_task=CLASSES)


def _data(task: int, n: int = 30) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(10 + task)
    return torch.randn(n, 5, generator=g), torch.randint(0, CLASSES[task], (n,), generator=g)


def _see_training_batch(method: Method, task: int) -> None:
    """What the trainer's first training batch tells the method: the batch size."""
    x, y = _data(task)
    method.training_loss(method.model, x[:TRAIN_BATCH], y[:TRAIN_BATCH], task)


def _move(model: nn.Module, seed: int, scale: float = 0.1) -> None:
    """Stand-in for training: every parameter moves a little (seeded)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


def _params(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _batches(n: int, size: int, order: Tensor | None = None) -> list[Tensor]:
    idx = torch.arange(n) if order is None else order
    return [idx[s:s + size] for s in range(0, n, size)]


def _grads(model: nn.Module, loss: Tensor) -> dict[str, Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
            for n, p in model.named_parameters()}


def _close(got: dict[str, Tensor], expect: dict[str, Tensor]) -> None:
    assert got.keys() == expect.keys()
    for n in expect:
        torch.testing.assert_close(got[n], expect[n], rtol=RTOL, atol=1e-12, msg=n)


def _authors_fisher(model: nn.Module, x: Tensor, y: Tensor, task: int, order: Tensor,
                    sbatch: int = 20) -> dict[str, Tensor]:
    """BLIP authors' ``fisher_matrix_diag``: train mode, the shuffled training loader,
    F += sbatch · (grad of the batch-mean CE with the true labels)², / len(loader)."""
    model.train()
    fisher = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    batches = _batches(x.shape[0], TRAIN_BATCH, order)
    for b in batches:
        g = _grads(model, F.cross_entropy(model(x[b], task), y[b]))
        for n in fisher:
            fisher[n] += sbatch * g[n].pow(2)
    return {n: f / len(batches) for n, f in fisher.items()}


def _shuffle(seed: int, task: int, n: int) -> Tensor:
    """The method's seeded stand-in for the reference's shuffled loader (same draw)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + task))


# -- EWC: Yujun-Shi/BLIP miniImageNetClassification/src/approaches/{ewc,utils}.py --------


def test_ewc_follows_the_blip_authors_baseline() -> None:
    model, seed, lamb = _model(), 4, 5000.0
    method = make_method("ewc", model, seed=seed)
    ref = copy.deepcopy(model)
    fisher = None
    for t in range(2):
        x, y = _data(t)
        _see_training_batch(method, t)
        stats = method.after_task(t, x, y)
        # the whole training set, in the training batch size: 30 = 8 + 8 + 8 + 6
        assert (stats["fisher_samples"], stats["fisher_batches"]) == (30, 4)
        f_new = _authors_fisher(ref, x, y, t, _shuffle(seed, t, x.shape[0]))
        # fisher = (fisher_new + fisher_old·t)/(t+1): the average over tasks
        fisher = f_new if fisher is None else {n: (f_new[n] + fisher[n] * t) / (t + 1)
                                               for n in f_new}
        model_old = _params(ref)  # the anchor: the model after the last task only
        _close(method.fisher, fisher)
        _move(model, seed=t)
        _move(ref, seed=t)
    # criterion: lamb · Σ sum(fisher·(θ_old − θ)²)/2
    params = dict(ref.named_parameters())
    expect = lamb * sum(torch.sum(fisher[n] * (model_old[n] - params[n]).pow(2)) / 2
                        for n in fisher)
    torch.testing.assert_close(method.penalty(), expect.detach(), rtol=RTOL, atol=0)


# -- online EWC: ContinualAI/avalanche avalanche/training/plugins/ewc.py, mode="online" ---


def _avalanche_fisher(model: nn.Module, x: Tensor, y: Tensor, task: int) -> dict[str, Tensor]:
    """Avalanche ``compute_importances``: eval mode, the dataset in order in batches of
    ``train_mb_size``, imp += (grad of the batch-mean CE)², / len(dataloader)."""
    model.eval()
    imp = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    batches = _batches(x.shape[0], TRAIN_BATCH)
    for b in batches:
        g = _grads(model, F.cross_entropy(model(x[b], task), y[b]))
        for n in imp:
            imp[n] += g[n].pow(2)
    model.train()
    return {n: i / len(batches) for n, i in imp.items()}


def test_online_ewc_follows_avalanche() -> None:
    model, lamb, decay = _model(), 5000.0, 0.7
    method = make_method("online-ewc", model, gamma=decay)
    ref = copy.deepcopy(model)
    importances = None
    for t in range(2):
        x, y = _data(t)
        _see_training_batch(method, t)
        method.after_task(t, x, y)
        new = _avalanche_fisher(ref, x, y, t)
        # update_importances: decay_factor · old + current
        importances = new if importances is None else {
            n: decay * importances[n] + new[n] for n in new}
        saved = _params(ref)
        _close(method.fisher, importances)
        _move(model, seed=t)
        _move(ref, seed=t)
    # before_backward: ewc_lambda · Σ imp·(θ − saved)², no ½
    params = dict(ref.named_parameters())
    expect = lamb * sum((importances[n] * (params[n] - saved[n]).pow(2)).sum()
                        for n in importances)
    torch.testing.assert_close(method.penalty(), expect.detach(), rtol=RTOL, atol=0)


# -- IMM-mode: Yujun-Shi/BLIP miniImageNetClassification/src/approaches/imm_mode.py -------


def test_imm_mode_follows_the_blip_authors_baseline() -> None:
    model, seed, lamb = _model(), 6, 0.01
    method = make_method("imm-mode", model, seed=seed)
    ref = copy.deepcopy(model)
    x, y = _data(0)
    _see_training_batch(method, 0)
    method.after_task(0, x, y)
    fisher = _authors_fisher(ref, x, y, 0, _shuffle(seed, 0, x.shape[0]))
    model_old = _params(ref)
    _close(method.fisher, fisher)
    _move(model, seed=1)
    _move(ref, seed=1)
    # criterion during task 1: lamb · Σ (θ − θ_old)²/2
    params = dict(ref.named_parameters())
    expect = lamb * sum((params[n] - model_old[n]).pow(2).sum() / 2 for n in params)
    torch.testing.assert_close(method.penalty(), expect.detach(), rtol=RTOL, atol=0)
    # model update after task 1: θ = (F_new θ + F θ_old)/(F + F_new), F += F_new
    x, y = _data(1)
    _see_training_batch(method, 1)
    trained = _params(ref)
    method.after_task(1, x, y)
    f_new = _authors_fisher(ref, x, y, 1, _shuffle(seed, 1, x.shape[0]))
    total = {n: fisher[n] + f_new[n] for n in fisher}
    _close(method.fisher, total)
    merged = _params(model)
    for n in trained:
        both = (fisher[n] > 0) & (f_new[n] > 0)  # elsewhere the project's documented choice
        expect = (f_new[n] * trained[n] + fisher[n] * model_old[n]) / total[n]
        torch.testing.assert_close(merged[n][both], expect[both], rtol=RTOL, atol=1e-7)
    assert all(bool(((fisher[n] > 0) & (f_new[n] > 0)).any()) for n in ("trunk.0.weight",))


def test_imm_mode_merge_false_runs_the_authors_script_as_it_ran() -> None:
    model = _model()
    method = make_method("imm-mode", model, seed=1, merge=False)
    for t in range(2):
        _see_training_batch(method, t)
        before = _params(model)
        method.after_task(t, *_data(t))
        _close(_params(model), before)  # their merge rebinds a local: the model is unchanged


# -- SI: ContinualAI/avalanche avalanche/training/plugins/synaptic_intelligence.py --------


MOMENTUM = 0.9  # with momentum, Δθ is not −lr·g: the path integral needs the actual step


def _si_batches(task: int) -> list[tuple[Tensor, Tensor]]:
    x, y = _data(task, n=24)
    return [(x[b], y[b]) for b in _batches(24, TRAIN_BATCH)] * 4  # 4 epochs


def _avalanche_si(model: nn.Module, si_lambda: float, eps: float, clip_to: float,
                  lr: float) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The plugin's loop over two experiences, SGD, the penalty in the loss."""
    names = [n for n, _ in model.named_parameters()]
    imp = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    cum = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    start = _params(model)
    for t in range(2):
        start = _params(model)  # init_batch: the weights at the experience's start
        traj = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
        # a fresh optimizer per experience, as both trainers make one per task
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=MOMENTUM)
        for xb, yb in _si_batches(t):
            old = _params(model)  # pre_update
            loss = F.cross_entropy(model(xb, t), yb)
            params = dict(model.named_parameters())
            loss = loss + sum(torch.dot(imp[n].flatten(), (params[n] - start[n]).pow(2)
                                        .flatten()) * (si_lambda / 2) for n in names)
            opt.zero_grad()
            loss.backward()
            opt.step()
            new = _params(model)  # post_update: trajectory += grad · (new − old)
            for n, p in model.named_parameters():
                if p.grad is not None:  # a head the loss does not reach: no step
                    traj[n] += p.grad * (new[n] - old[n])
        end = _params(model)  # update_ewc_data with c=1, clip_to
        for n in names:
            cum[n] += traj[n] / ((end[n] - start[n]).pow(2) + eps)
            imp[n] = torch.clamp(-cum[n], max=clip_to)
        start = end  # the anchor is the experience's end weights
    _move(model, seed=5)
    params = dict(model.named_parameters())
    penalty = sum(torch.dot(imp[n].flatten(), (params[n] - start[n]).pow(2).flatten())
                  * (si_lambda / 2) for n in names)
    return imp, {"penalty": penalty.detach()}


def _blip_si(model: nn.Module, lr: float, **hp) -> Method:
    method = make_method("si", model, penalty_step="gradient", momentum=MOMENTUM, **hp)
    for t in range(2):
        method.before_task(t)
        opt = method.make_optimizer(t, lr)
        for xb, yb in _si_batches(t):
            loss = method.training_loss(model, xb, yb, t)
            opt.zero_grad()
            loss.backward()
            method.after_backward(t)
            opt.step()
            method.after_step(t)
        method.after_task(t, *_data(t))
    return method


@pytest.mark.parametrize("clip_to", [1e-3, 1e3])  # Avalanche's clip_to; a loose one
def test_si_follows_avalanche(clip_to: float) -> None:
    c, eps, lr = 0.1, 1e-7, 0.1
    model = _model()
    ref = copy.deepcopy(model)
    method = _blip_si(model, lr, c=c, omega_max=clip_to)
    imp, out = _avalanche_si(ref, c, eps, clip_to, lr)
    _close(method.omega_total, imp)
    _move(model, seed=5)
    torch.testing.assert_close(method.penalty(), out["penalty"], rtol=RTOL, atol=0)
    # teeth: the clip binds (with Avalanche's 1e-3 nearly everywhere: ω/(Δ²+ξ) is ≫ 1e-3
    # here), and with the loose one most importances lie below it
    assert any(bool((i == clip_to).any()) for i in imp.values())
    if clip_to > 1:
        assert sum(int((i < clip_to).sum()) for i in imp.values()) > 0.9 * sum(
            i.numel() for i in imp.values())


# -- MAS: ContinualAI/avalanche avalanche/training/plugins/mas.py --------------------------


def _avalanche_mas(model: nn.Module, x: Tensor, task: int) -> dict[str, Tensor]:
    """``_get_importance``: train mode, the dataset in order in batches of train_mb_size,
    importance += |grad of mean_b ‖out‖²_fro|, / len(dataloader)."""
    model.train()
    imp = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    batches = _batches(x.shape[0], TRAIN_BATCH)
    for b in batches:
        g = _grads(model, torch.norm(model(x[b], task), p="fro", dim=1).pow(2).mean())
        for n in imp:
            imp[n] += g[n].abs()
    return {n: i / len(batches) for n, i in imp.items()}


def test_mas_follows_avalanche() -> None:
    model, lamb, alpha = _model(), 1.0, 0.5
    method = make_method("mas", model)
    ref = copy.deepcopy(model)
    importance = None
    for t in range(2):
        x, y = _data(t)
        _see_training_batch(method, t)
        method.after_task(t, x, y)
        cur = _avalanche_mas(ref, x, t)
        # alpha · old + (1 − alpha) · current
        importance = cur if importance is None else {
            n: alpha * importance[n] + (1 - alpha) * cur[n] for n in cur}
        saved = _params(ref)
        _close(method.omega, importance)
        _move(model, seed=t)
        _move(ref, seed=t)
    params = dict(ref.named_parameters())
    expect = lamb * sum(torch.sum(importance[n] * (params[n] - saved[n]).pow(2))
                        for n in importance)
    torch.testing.assert_close(method.penalty(), expect.detach(), rtol=RTOL, atol=0)


# -- states of the conventions before are refused, not misread -----------------------------


@pytest.mark.parametrize("name", ["ewc", "online-ewc", "imm-mode", "si", "mas"])
def test_a_state_of_the_older_conventions_is_refused(name: str) -> None:
    model = _model()
    method = make_method(name, model)
    state = method.state_dict()
    old = {k: v for k, v in state.items() if k not in ("conventions", "train_batch_size")}
    with pytest.raises(KeyError, match="conventions"):  # the trainer: "another version"
        make_method(name, model).load_state_dict(old)
    other = {**state, "conventions": {**state["conventions"], "version": 1}}
    with pytest.raises(ValueError, match="made with"):
        make_method(name, model).load_state_dict(other)
    if name == "si":
        with pytest.raises(KeyError, match="importance_sum"):
            make_method(name, model).load_state_dict(
                {"omega": {}, "anchor": {}, "path": {}, "start": {},
                 "conventions": state["conventions"], "train_batch_size": 8})


def test_ewc_state_of_another_fisher_convention_is_refused() -> None:
    model = _model()
    state = make_method("ewc", model, fisher="blip").state_dict()
    with pytest.raises(ValueError, match="fisher"):
        make_method("ewc", model).load_state_dict(state)
