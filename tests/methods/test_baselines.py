"""Baselines (blip/methods/): state round-trips, each method's mechanism, and
tiny end-to-end trainer runs (with an interrupted-and-resumed run per method)."""

from __future__ import annotations

import copy
import io
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _support import run_killed_then_resumed
from torch import Tensor, nn

from blip.fisher import true_fisher
from blip.methods import Method, distillation_loss, make_method
from blip.models import MLP, MultiHead

BASELINES = ["ewc", "online-ewc", "si", "mas", "imm-mode", "lwf", "agem"]
CLASSES = (3, 3, 3)


class TinyConv(MultiHead):
    """conv -> ReLU -> linear -> heads: exercises both Fisher kernels."""

    def __init__(self, classes: tuple[int, ...] = CLASSES) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.fc = nn.Linear(3 * 4 * 4, 8)
        self.heads = nn.ModuleList(nn.Linear(8, c) for c in classes)

    def features(self, x: Tensor) -> Tensor:
        return F.relu(self.fc(F.relu(self.conv(x)).flatten(1)))


def _data(task: int, n: int = 40, shape: tuple[int, ...] = (6,)) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(100 + task)
    x = torch.randn(n, *shape, generator=g)
    y = torch.randint(0, CLASSES[task], (n,), generator=g)
    return x, y


def _mlp(seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    return MLP(6, hidden=8, classes_per_task=CLASSES)


def _train(method: Method, task: int, x: Tensor, y: Tensor, steps: int = 5,
           finish: bool = True, lr: float = 0.1) -> None:
    """The trainer's protocol, on mini-batches of 16."""
    model = method.model
    method.before_task(task)
    opt = method.make_optimizer(task, lr)
    model.train()
    for s in range(steps):
        i = (s * 16) % len(y)
        loss = method.training_loss(model, x[i:i + 16], y[i:i + 16], task)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        method.after_backward(task)
        opt.step()
        method.after_step(task)
    if finish:
        method.after_task(task, x, y)


def _fresh(name: str, model: nn.Module, **hp) -> Method:
    method = make_method(name, model, **hp)
    method.prepare()
    return method


# -- state round-trip ---------------------------------------------------------------------


@pytest.mark.parametrize("name", BASELINES)
def test_state_round_trips_through_a_checkpoint(name: str) -> None:
    model = _mlp()
    method = _fresh(name, model, seed=3) if name not in ("si", "lwf") else _fresh(name, model)
    _train(method, 0, *_data(0))
    _train(method, 1, *_data(1))
    _train(method, 2, *_data(2), steps=2, finish=False)  # mid-task: SI's accumulators live
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "method": method.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)

    model2 = _mlp(seed=1)  # different init: everything must come from the checkpoint
    model2.load_state_dict(saved["model"])
    method2 = _fresh(name, model2, **{k: v for k, v in method.hparams.items()
                                      if k in ("seed",)})
    method2.load_state_dict(saved["method"])
    x, y = _data(2)
    for task in (2, 1):
        assert torch.equal(method.training_loss(model, x, y, task),
                           method2.training_loss(model2, x, y, task))
    if hasattr(method, "penalty"):
        assert method.penalty().item() > 0  # the parameters moved since the anchor
        assert torch.equal(method.penalty(), method2.penalty())
    if name == "agem":
        assert torch.equal(method.memory_loss(model), method2.memory_loss(model2))
    if name == "si":
        for k in ("path", "start", "importance_sum", "anchor"):
            a, b = method.state_dict()[k], method2.state_dict()[k]
            assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    # the restored method keeps working: a further task runs and gives the same state
    _train(method, 2, x, y, steps=0)
    _train(method2, 2, x, y, steps=0)
    flat, flat2 = _tensors(method.state_dict()), _tensors(method2.state_dict())
    assert len(flat) == len(flat2)
    assert all(torch.equal(a, b) for a, b in zip(flat, flat2, strict=True))


def _tensors(obj: object) -> list[Tensor]:
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for k in sorted(obj) for t in _tensors(obj[k])]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    return []


def test_bad_hyperparameters_name_them() -> None:
    with pytest.raises(ValueError, match="lamb"):
        make_method("ewc", _mlp(), lamb=-1.0)
    with pytest.raises(ValueError, match="gamma"):
        make_method("online-ewc", _mlp(), gamma="x")
    with pytest.raises(ValueError, match="xi"):
        make_method("si", _mlp(), xi=0.0)
    with pytest.raises(ValueError, match="mem_per_task"):
        make_method("agem", _mlp(), mem_per_task=0)
    with pytest.raises(TypeError, match="unknown hyper-parameters"):
        make_method("lwf", _mlp(), temperature=2.0)


# -- EWC / online EWC / IMM: penalty and true Fisher ---------------------------------------


def _brute_fisher(model: nn.Module, x: Tensor, task: int, seed: int, n_batches: int,
                  batch_size: int) -> dict[str, Tensor]:
    """Per-sample autograd with the same draws as blip.fisher (subset, then targets)."""
    g = torch.Generator().manual_seed(seed * 100003 + task)
    order = torch.randperm(x.shape[0], generator=g)[: n_batches * batch_size]
    params = dict(model.named_parameters())
    acc = {n: torch.zeros_like(p) for n, p in params.items()}
    model.eval()
    for s in range(0, order.numel(), batch_size):
        xb = x[order[s:s + batch_size]]
        with torch.no_grad():
            probs = F.softmax(model(xb, task), -1)
        yb = torch.multinomial(probs, 1, generator=g).squeeze(-1)
        for i in range(xb.shape[0]):
            loss = F.cross_entropy(model(xb[i:i + 1], task), yb[i:i + 1]) / xb.shape[0]
            grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
            for (n, _), gr in zip(params.items(), grads, strict=True):
                if gr is not None:
                    acc[n] += gr.pow(2)
    model.train()
    return {n: a / order.numel() for n, a in acc.items()}


@pytest.mark.parametrize("name", ["ewc", "online-ewc", "imm-mode"])
def test_fisher_is_the_per_sample_true_fisher(name: str) -> None:
    torch.manual_seed(0)
    model = TinyConv()
    method = _fresh(name, model, seed=5, fisher="blip", fisher_batches=3, fisher_batch_size=7)
    x, y = _data(1, n=30, shape=(1, 4, 4))  # 3 batches of 7 out of 30: subset drawn
    expect = _brute_fisher(copy.deepcopy(model), x, 1, 5, 3, 7)
    stats = method.after_task(1, x, y)
    got = method.fisher
    assert stats["fisher_samples"] == 21 and stats["unregularised"] == []
    assert got.keys() == expect.keys()
    for n in expect:
        torch.testing.assert_close(got[n], expect[n], rtol=1e-4, atol=1e-9)
    assert got["heads.0.weight"].abs().sum() == 0 and got["heads.1.weight"].sum() > 0


def test_true_fisher_short_last_batch_and_errors() -> None:
    torch.manual_seed(0)
    model = TinyConv()
    x = torch.randn(17, 1, 4, 4)  # batches of 7, 7, 3: every square carries 1/7
    layers = [("conv", model.conv), ("fc", model.fc)]
    fisher, n = true_fisher(model, layers, x, lambda v: model(v, 0), n_batches=5, batch_size=7,
                            generator=torch.Generator().manual_seed(0))
    assert n == 17 and set(fisher) == {"conv.weight", "conv.bias", "fc.weight", "fc.bias"}
    expect = _brute_fisher(copy.deepcopy(model), x, 0, 0, 5, 7)  # same draws: seed 0, task 0
    for k, f in fisher.items():
        torch.testing.assert_close(f, expect[k], rtol=1e-4, atol=1e-9)
    with pytest.raises(TypeError, match="nn.Linear/nn.Conv2d"):
        true_fisher(model, [("relu", nn.ReLU())], x, lambda v: model(v, 0))
    with pytest.raises(TypeError, match=r"\(name, layer\) pairs"):
        true_fisher(model, [model.fc], x, lambda v: model(v, 0))


@pytest.mark.parametrize("name", ["ewc", "online-ewc"])
def test_ewc_penalty_zero_at_anchor_and_grows(name: str) -> None:
    model = _mlp()
    method = _fresh(name, model, seed=0)
    _train(method, 0, *_data(0))
    assert method.penalty().item() == 0.0
    anchor = copy.deepcopy(model.state_dict())
    d = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    values = []
    for eps in (1e-3, 1e-2, 1e-1):
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(anchor[n] + eps * d[n])
        values.append(method.penalty().item())
    assert 0 < values[0] < values[1] < values[2]
    # quadratic: λ/2 Σ F (εd)² scales as ε²
    assert values[2] / values[1] == pytest.approx(100, rel=1e-3)
    fisher = method.fisher
    half = 0.5 if name == "ewc" else 1.0  # the authors' EWC: λ/2; Avalanche's online: λ
    direct = half * method.hparams["lamb"] * sum((fisher[n] * (0.1 * d[n]) ** 2).sum()
                                                 for n in fisher)
    assert values[2] == pytest.approx(float(direct), rel=1e-5)


def test_ewc_summed_penalty_has_the_per_task_gradient() -> None:
    """EWC keeps Σ_k F_k(θ−θ*_k)² as F(θ−θ̄)²: same gradient, constant memory."""
    model = _mlp()
    ewc = _fresh("ewc", model, accumulate="sum")
    names = [n for n, _ in model.named_parameters()]
    terms = []
    g = torch.Generator().manual_seed(5)
    for _ in range(3):
        f = {n: torch.rand(p.shape, generator=g) * (torch.rand(p.shape, generator=g) > 0.3)
             for n, p in model.named_parameters()}
        a = {n: torch.randn(p.shape, generator=g) for n, p in model.named_parameters()}
        terms.append((f, a))
        ewc.absorb(f, a)
    assert ewc.tasks == 3 and set(ewc.fisher) == set(names)
    params = list(model.parameters())
    got = torch.autograd.grad(ewc.penalty(), params)
    direct = 0.5 * ewc.hparams["lamb"] * sum(
        sum((f[n] * (p - a[n]).pow(2)).sum() for n, p in model.named_parameters())
        for f, a in terms)
    expect = torch.autograd.grad(direct, params)
    for u, v in zip(got, expect, strict=True):
        torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-3)
    assert ewc.extra_state_bytes() == 2 * 4 * sum(p.numel() for p in params)


def test_online_ewc_keeps_one_running_fisher() -> None:
    online = _fresh("online-ewc", _mlp(), seed=1, gamma=0.5, fisher="blip")
    _train(online, 0, *_data(0))
    f0 = {n: f.clone() for n, f in online.fisher.items()}
    x1, y1 = _data(1)
    _train(online, 1, x1, y1, finish=False)
    model = online.model
    f1, _ = true_fisher(copy.deepcopy(model), [(n, m) for n, m in model.named_modules()
                                               if isinstance(m, nn.Linear)],
                        x1, lambda v, m=model: m(v, 1),
                        generator=torch.Generator().manual_seed(1 * 100003 + 1))
    online.after_task(1, x1, y1)
    for n in f0:
        torch.testing.assert_close(online.fisher[n], 0.5 * f0[n] + f1[n])
    assert all(torch.equal(online.anchor[n], p.detach())
               for n, p in online.model.named_parameters())


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_proximal_step_keeps_the_penalised_optimum_with_momentum(momentum: float) -> None:
    """Loss g·θ (constant gradient) + s·w(θ−a)²: SGD (with momentum) + the proximal pull
    must settle at the penalised optimum a − g/(2sw), not a weaker one."""
    model = _mlp()
    method = _fresh("mas", model, momentum=momentum, lamb=2.0)
    w = {n: torch.full_like(p, 3.0) for n, p in model.named_parameters()}
    a = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    method.omega, method.anchor = w, a
    method._changed()
    g = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    opt = method.make_optimizer(1, 0.05)
    for _ in range(600):
        for n, p in model.named_parameters():
            p.grad = g[n].clone()
        opt.step()
        method.after_step(1)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), a[n] - g[n] / (2 * 2.0 * 3.0), rtol=1e-4,
                                   atol=1e-4)


@pytest.mark.parametrize("name", ["ewc", "si", "mas", "imm-mode"])
def test_proximal_penalty_step_is_stable_and_first_order_exact(name: str) -> None:
    """The proximal step minimises ‖θ−θ_sgd‖²/(2lr) + penalty: it never overshoots the
    anchor (stable for any stiffness) and matches the gradient step for a small lr."""
    model = _mlp()
    method = _fresh(name, model)
    _train(method, 0, *_data(0))
    weight, anchor = method.quadratic()
    for w in weight.values():  # a stiffness far beyond the explicit step's limit of 2
        w.fill_(1e6) if w.dim() else None
    method._changed()
    method.hparams["lamb" if name != "si" else "c"] = 1e6
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    method.make_optimizer(1, 0.1)
    method.proximal_step()
    for n, p in model.named_parameters():
        if n in weight:
            gap, new_gap = (before[n] - anchor[n]).abs(), (p.detach() - anchor[n]).abs()
            assert (new_gap <= gap + 1e-6).all(), n  # contracts towards the anchor
            assert (new_gap <= 0.01 * gap + 1e-6).all(), n  # k ≫ 1: lands near it
            assert torch.isfinite(p).all()
    # small k = 2·lr·strength·w: the proximal step is θ − lr·∇penalty up to O(k)
    model = _mlp()
    method = _fresh(name, model, **({"fisher": "blip"} if name == "ewc" else {}))  # small F
    _train(method, 0, *_data(0))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    lr = 1e-3
    method.make_optimizer(1, lr)
    k_max = max(float(w.max()) for w in method.quadratic()[0].values()) * 2 * lr * \
        method.strength
    assert 0 < k_max < 0.05
    grads = torch.autograd.grad(method.penalty(), list(model.parameters()), allow_unused=True)
    before = [p.detach().clone() for p in model.parameters()]
    method.proximal_step()
    for p, b, g in zip(model.parameters(), before, grads, strict=True):
        expect = torch.zeros_like(p) if g is None else -lr * g
        torch.testing.assert_close(p.detach() - b, expect, rtol=k_max, atol=1e-6)


def test_imm_mode_merges_with_fisher_weights() -> None:
    model = _mlp()
    method = _fresh("imm-mode", model, seed=2, fisher="blip")
    _train(method, 0, *_data(0))
    f0 = {n: f.clone() for n, f in method.fisher.items()}
    prev = {n: p.clone() for n, p in method.prev.items()}
    x1, y1 = _data(1)
    _train(method, 1, x1, y1, finish=False)
    trained = {n: p.detach().clone() for n, p in model.named_parameters()}
    f1, _ = true_fisher(copy.deepcopy(model), [(n, m) for n, m in model.named_modules()
                                               if isinstance(m, nn.Linear)],
                        x1, lambda v, m=model: m(v, 1),
                        generator=torch.Generator().manual_seed(2 * 100003 + 1))
    method.after_task(1, x1, y1)
    for n, p in model.named_parameters():
        total = f0[n] + f1[n]
        expect = torch.where(f0[n] == 0, trained[n], torch.where(
            f1[n] == 0, prev[n], (f0[n] * prev[n] + f1[n] * trained[n]) / total))
        torch.testing.assert_close(p.detach(), expect, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(method.fisher[n], total)
        assert torch.equal(method.prev[n], p.detach())  # training continues from the merge
    # a head used only by task 1 keeps its trained value, task 0's its merged one, and
    # one never used stays as it was
    assert torch.equal(model.heads[1].weight.detach(), trained["heads.1.weight"])
    assert torch.equal(model.heads[0].weight.detach(), prev["heads.0.weight"])
    assert torch.equal(model.heads[2].weight.detach(), trained["heads.2.weight"])


# -- SI -------------------------------------------------------------------------------------


def test_si_path_integral_and_importance() -> None:
    model = _mlp()
    method = _fresh("si", model)
    x, y = _data(0)
    # one step of plain SGD from θ: ω = −g·Δθ = lr·g²
    method.before_task(0)
    opt = method.make_optimizer(0, 0.1)
    loss = method.training_loss(model, x[:16], y[:16], 0)
    opt.zero_grad()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    method.after_backward(0)
    opt.step()
    method.after_step(0)
    for n, g in grads.items():
        torch.testing.assert_close(method.path[n], 0.1 * g * g)
    start = {n: p.clone() for n, p in method.start.items()}
    _train(method, 0, x, y, steps=6, finish=False)
    method.start = start  # the task began before that first step
    method.after_task(0, x, y)
    for n, p in model.named_parameters():
        omega = method.omega_total[n]
        moved = p.detach() != start[n]
        assert (omega >= 0).all(), n
        assert (omega[moved] > 0).all(), n
        assert (omega[~moved] == 0).all(), n
    assert method.omega_total["heads.1.weight"].sum() == 0  # an unused head is free
    assert method.penalty().item() == 0.0  # at the anchor


# -- MAS ------------------------------------------------------------------------------------


def test_mas_importance_matches_brute_force() -> None:
    torch.manual_seed(0)
    model = TinyConv()
    method = _fresh("mas", model, chunk=7, importance="per-sample")
    x, y = _data(0, n=20, shape=(1, 4, 4))
    params = dict(model.named_parameters())
    expect = {n: torch.zeros_like(p) for n, p in params.items()}
    for i in range(x.shape[0]):
        out = model(x[i:i + 1], 0).pow(2).sum()
        for (n, _), g in zip(params.items(), torch.autograd.grad(out, list(params.values()),
                                                                 allow_unused=True),
                             strict=True):
            if g is not None:
                expect[n] += g.abs()
    method.after_task(0, x, y)
    for n in params:
        torch.testing.assert_close(method.omega[n], expect[n] / 20, rtol=1e-5, atol=1e-8)
    assert method.penalty().item() == 0.0
    with torch.no_grad():
        model.fc.weight.add_(0.1)
    assert method.penalty().item() > 0


# -- LwF ------------------------------------------------------------------------------------


def test_lwf_targets_come_from_the_old_model() -> None:
    model = _mlp()
    method = _fresh("lwf", model, lamb=1.0, T=2.0, eps=0.0)  # the plain formula below
    x0, y0 = _data(0)
    _train(method, 0, x0, y0)
    assert method.distillation_targets(x0, 0) == []
    frozen = copy.deepcopy(model).eval()
    x, y = _data(2)
    before = method.distillation_targets(x, 2)
    assert len(before) == 1  # only task 0 is old
    torch.testing.assert_close(before[0], frozen(x, 0))
    with torch.no_grad():  # the live model changes; the targets must not
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    after = method.distillation_targets(x, 2)
    assert torch.equal(before[0], after[0])
    loss = method.training_loss(model, x, y, 2)
    expect = F.cross_entropy(model(x, 2), y) + distillation_loss(model(x, 0), before[0], 2.0)
    torch.testing.assert_close(loss, expect)
    # T: softmax(z)^(1/T), renormalised, is softmax(z/T)
    z, t = torch.randn(4, 3), torch.randn(4, 3)
    p = F.softmax(t, 1) ** 0.5
    p = p / p.sum(1, keepdim=True)
    q = F.softmax(z, 1) ** 0.5
    q = q / q.sum(1, keepdim=True)
    torch.testing.assert_close(distillation_loss(z, t, 2.0), -(p * q.log()).sum(1).mean())


# -- A-GEM ----------------------------------------------------------------------------------


def _ref_grad(method: Method) -> list[Tensor]:
    shared = method.shared_parameters()
    return list(torch.autograd.grad(method.memory_loss(method.model), shared))


def _dot(a: list[Tensor], b: list[Tensor]) -> float:
    return float(sum((u * v).sum() for u, v in zip(a, b, strict=True)))


def test_agem_projection_never_opposes_the_memory_gradient() -> None:
    model = _mlp()
    method = _fresh("agem", model, mem_per_task=20, ref_batch_size=1000, seed=0,
                    convention="blip")  # shared-only projection (Avalanche's: conventions_b)
    _train(method, 0, *_data(0))
    assert len(method.mem_x) == 1 and len(method.mem_y[0]) == 20
    shared = method.shared_parameters()
    assert not any(p is q for p in shared for q in model.heads.parameters())
    ref = _ref_grad(method)  # the whole memory is the reference batch here
    # a gradient that opposes the memory one: projected onto its orthogonal complement
    g0 = [-r + 0.1 * torch.randn_like(r) for r in ref]
    for p, g in zip(shared, g0, strict=True):
        p.grad = g.clone()
    head_grad = torch.randn_like(model.heads[1].weight)
    model.heads[1].weight.grad = head_grad.clone()
    assert _dot(g0, ref) < 0
    method.after_backward(1)
    got = [p.grad for p in shared]
    assert _dot(got, ref) == pytest.approx(0.0, abs=1e-5)
    alpha = _dot(g0, ref) / _dot(ref, ref)
    for g, r, p in zip(g0, ref, got, strict=True):
        torch.testing.assert_close(p, g - alpha * r, rtol=1e-4, atol=1e-6)
    assert torch.equal(model.heads[1].weight.grad, head_grad)  # heads untouched
    # an agreeing gradient is left as it is
    for p, r in zip(shared, ref, strict=True):
        p.grad = r.clone()
    method.after_backward(1)
    assert all(torch.equal(p.grad, r) for p, r in zip(shared, ref, strict=True))
    # during real training, every step's update satisfies g·g_ref >= 0
    x, y = _data(1)
    for s in range(4):
        loss = method.training_loss(model, x[s * 8:(s + 1) * 8], y[s * 8:(s + 1) * 8], 1)
        model.zero_grad()
        loss.backward()
        method.after_backward(1)
        assert _dot([p.grad for p in shared], _ref_grad(method)) >= -1e-6
        with torch.no_grad():
            for p in model.parameters():
                if p.grad is not None:
                    p.sub_(0.5 * p.grad)


# -- end to end -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", BASELINES)
def test_trainer_runs_and_resumes(name: str, pdigits3, tmp_path: Path) -> None:
    from blip.classification.trainer import TrainConfig

    cfg = TrainConfig.from_preset("pdigits", method=name, n_tasks=3, epochs=3, batch_size=64,
                                  threads=1)
    full, resumed = run_killed_then_resumed(cfg, pdigits3, tmp_path)
    saved = json.loads((tmp_path / "full" / "results.json").read_text())
    assert saved["complete"] and saved["method"] == name and saved["acc"] > 0.5
    assert (tmp_path / "full" / "checkpoint.pt").is_file()
    assert resumed["acc_matrix"] == full["acc_matrix"]


def test_resume_with_an_old_method_state_layout_is_a_clear_error(pdigits3, tmp_path: Path) -> None:
    from blip.classification.trainer import TrainConfig, Trainer
    from blip.runs.checkpoint import load, save_atomic

    cfg = TrainConfig.from_preset("pdigits", method="ewc", n_tasks=2, epochs=1, threads=1)
    Trainer(cfg, tmp_path, quiet=True, plots=False, stream=pdigits3.truncated(2)).run()
    c = load(tmp_path / "checkpoint.pt")
    c["method"] = {"fishers": [], "anchors": []}  # the per-task layout of an older EWC
    save_atomic(c, tmp_path / "checkpoint.pt")
    with pytest.raises(ValueError, match="state lacks 'conventions'"):
        Trainer(cfg, tmp_path, quiet=True, plots=False, stream=pdigits3.truncated(2)).run(
            resume=True)
