"""Each method against its reference implementation's formula (issue 14), second part:
lwf, agem, hat, packnet, finetune, freeze.

Every test computes the method's quantity (distillation loss, projection, masks, pruning,
the parameters a step updates) on a tiny fixed model and batch twice: with blip's code, and
with a direct transcription of the reference's formula written here (not the reference's
code). The reference each method follows is named in its module's docstring.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from blip.methods import Method, make_method
from blip.models import MLP

CLASSES = (3, 3, 3)


def _data(task: int, n: int = 24) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(200 + task)
    return torch.randn(n, 6, generator=g), torch.randint(0, CLASSES[task], (n,), generator=g)


def _mlp(seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    return MLP(6, hidden=8, classes_per_task=CLASSES)


def _fresh(name: str, model: nn.Module, **hp: object) -> Method:
    method = make_method(name, model, **hp)
    method.prepare()
    return method


def _steps(method: Method, task: int, steps: int = 3, lr: float = 0.1) -> None:
    """The trainer's protocol for a few batches of task ``task`` (no after_task)."""
    x, y = _data(task)
    method.before_task(task)
    opt = method.make_optimizer(task, lr)
    method.model.train()
    for s in range(steps):
        xb, yb = x[s * 8:(s + 1) * 8], y[s * 8:(s + 1) * 8]
        loss = method.training_loss(method.model, xb, yb, task)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        method.after_backward(task)
        opt.step()
        method.after_step(task)


def _task(method: Method, task: int, steps: int = 3) -> None:
    _steps(method, task, steps)
    method.after_task(task, *_data(task))


# -- LwF: the BLIP authors' miniImageNetClassification/src/approaches/lwf.py -----------------


def _authors_kd(outputs: Tensor, targets: Tensor, exp: float, eps: float = 1e-5) -> Tensor:
    """Their utils.cross_entropy: both softmaxes raised to ``exp`` and renormalised (when
    exp != 1), eps/C added to the student's and renormalised, −Σ tar·log out, batch mean."""
    out, tar = F.softmax(outputs, dim=1), F.softmax(targets, dim=1)
    if exp != 1:
        out = out.pow(exp) / out.pow(exp).sum(1, keepdim=True)
        tar = tar.pow(exp) / tar.pow(exp).sum(1, keepdim=True)
    out = out + eps / out.shape[1]
    out = out / out.sum(1, keepdim=True)
    return -(tar * out.log()).sum(1).mean()


@pytest.mark.parametrize("T", [None, 2.0])  # None: the default (theirs, T=1)
def test_lwf_loss_is_the_authors(T: float | None) -> None:
    model = _mlp()
    method = _fresh("lwf", model, **({} if T is None else {"T": T}))
    _task(method, 0)
    _task(method, 1)
    old = [h.detach() for h in (method.old_model(_data(2)[0], k) for k in range(2))]
    x, y = _data(2)
    got = method.training_loss(model, x, y, 2)
    lamb, t = 2.0, 1.0 if T is None else T  # their Appr(lamb=2, T=1)
    kd = sum(_authors_kd(model(x, k), old[k], exp=1 / t) for k in range(2))
    want = F.cross_entropy(model(x, 2), y) + lamb * kd
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)


def test_lwf_clips_the_gradient_norm_at_100() -> None:
    model = _mlp()
    method = _fresh("lwf", model)
    params = list(model.parameters())
    grads = [torch.full_like(p, 50.0) for p in params]  # total norm far above 100
    for p, g in zip(params, grads, strict=True):
        p.grad = g.clone()
    method.after_backward(0)
    # their clip_grad_norm(model.parameters(), 100): g · 100 / ‖g‖
    norm = torch.sqrt(sum((g ** 2).sum() for g in grads))
    for p, g in zip(params, grads, strict=True):
        torch.testing.assert_close(p.grad, g * (100.0 / (norm + 1e-6)), rtol=1e-5, atol=0)


# -- A-GEM: Avalanche's avalanche/training/plugins/agem.py -----------------------------------


def test_agem_reference_batch_is_task_balanced() -> None:
    method = _fresh("agem", _mlp(), mem_per_task=30, seed=0)
    for t in range(3):
        _task(method, t, steps=1)
    idx = method.reference_indices()
    task_of = torch.arange(72) // 24  # _data gives 24 samples per task: all kept
    # their GroupBalancedInfiniteDataLoader: batch_size = sample_size // groups per group
    assert torch.bincount(task_of[idx], minlength=3).tolist() == [64 // 3] * 3
    assert len(set(idx.tolist())) == len(idx)  # no sample twice within a group's batch


def test_agem_projection_is_avalanches() -> None:
    model = _mlp()
    # 2 tasks of 5 samples and sample_size 10: the whole memory is the reference batch
    method = _fresh("agem", model, mem_per_task=5, ref_batch_size=10, seed=0)
    _task(method, 0, steps=1)
    _task(method, 1, steps=1)
    method.before_task(2)
    params = list(model.parameters())

    def flat(grads: list[Tensor | None]) -> Tensor:
        # their view: every named parameter, a missing gradient as zeros
        return torch.cat([torch.zeros(p.numel()) if g is None else g.reshape(-1)
                          for p, g in zip(params, grads, strict=True)])

    mx, my = torch.cat(method.mem_x), torch.cat(method.mem_y)
    ref_loss = torch.cat([F.cross_entropy(model(mx[k * 5:(k + 1) * 5], k), my[k * 5:(k + 1) * 5],
                                          reduction="none") for k in range(2)]).mean()
    ref = flat(list(torch.autograd.grad(ref_loss, params, allow_unused=True)))
    # the current task's gradient opposes the memory's; old heads have none (set_to_none)
    old_heads = {id(p) for k in (0, 1) for p in model.heads[k].parameters()}
    g = torch.Generator().manual_seed(5)
    cur = [None if id(p) in old_heads else torch.randn(p.shape, generator=g) for p in params]
    offset = 0
    for i, p in enumerate(params):
        if cur[i] is not None:
            cur[i] = cur[i] - 3.0 * ref[offset:offset + p.numel()].view_as(p)
        offset += p.numel()
    gvec = flat(cur)
    assert float(gvec @ ref) < 0
    for p, c in zip(params, cur, strict=True):
        p.grad = None if c is None else c.clone()
    method.after_backward(2)
    proj = gvec - ref * (gvec @ ref) / (ref @ ref)  # their grad_proj
    offset = 0
    for p, c in zip(params, cur, strict=True):
        if c is None:
            assert p.grad is None  # they copy only into gradients that exist
        else:
            torch.testing.assert_close(p.grad, proj[offset:offset + p.numel()].view_as(p),
                                       rtol=1e-5, atol=1e-7)
        offset += p.numel()


# -- PackNet: arunmallya/packnet src/prune.py, src/main.py, src/scripts/run_sequence.sh ------


def test_packnet_prunes_at_the_authors_cutoff() -> None:
    model = _mlp()
    method = _fresh("packnet", model)
    _steps(method, 0)
    layer = model.trunk[0]
    with torch.no_grad():  # a tie at the cut-off: their `weights.abs().le(cutoff)` takes both
        w = layer.weight.view(-1)
        order = w.abs().argsort()
        k = round(0.75 * w.numel())
        w[order[k]] = -w[order[k - 1]]
    before = {n: m.weight.detach().clone() for n, m in method.layers}
    keep = method.release(0)
    for (n, m), kept in zip(method.layers, keep, strict=True):
        mags = before[n].abs()
        cutoff = mags.view(-1).kthvalue(round(0.75 * mags.numel())).values  # SparsePruner
        removed = mags.le(cutoff)  # every weight is the first task's
        assert torch.equal(kept, ~removed), n
        assert torch.equal(m.weight.detach(), torch.where(removed, 0.0, before[n]))
    assert int((~keep[0]).sum()) == k + 1  # the tie went too


def test_packnet_retrains_as_the_authors_and_leaves_the_last_task_whole(monkeypatch) -> None:
    made: list[dict] = []

    class Recording(torch.optim.SGD):
        def __init__(self, params, **kw):
            made.append(kw)
            super().__init__(params, **kw)

    model = _mlp()
    method = _fresh("packnet", model)
    monkeypatch.setattr(torch.optim, "SGD", Recording)
    _steps(method, 0)  # trained at lr 0.1 (make_optimizer)
    made.clear()
    x, y = _data(0)
    stats = method.after_task(0, x, y)
    # post_prune_epochs 10, batch_size 32, SGD(lr = 1e-4 after 1e-3 training, momentum 0.9)
    assert stats["retrain_steps"] == 10 * -(-len(y) // 32)
    assert made == [{"lr": pytest.approx(0.01), "momentum": 0.9}]
    _task(method, 1)
    _steps(method, 2)
    free = [(o == 0) for o in method.owners]
    w_before = [m.weight.detach().clone() for _, m in method.layers]
    stats = method.after_task(2, *_data(2))  # the model's last head: prune -1, no retraining
    assert stats["retrain_steps"] == 0
    for (_, m), f, o, w in zip(method.layers, free, method.owners, w_before, strict=True):
        assert torch.equal(o == 3, f) and torch.equal(m.weight.detach(), w)


# -- HAT: joansj/hat src/approaches/hat.py --------------------------------------------------


def test_hat_schedule_regulariser_masks_and_gradients_are_the_authors() -> None:
    model = MLP(6, hidden=8, classes_per_task=CLASSES, n_hidden_layers=2)
    method = _fresh("hat", model)
    smax = 400.0
    _steps(method, 0)  # the first epoch: its length is learned at the next one's start
    method.before_epoch(0, 1)
    scales = []
    for b in range(3):
        x, y = _data(0)
        method.training_loss(model, x[b * 8:(b + 1) * 8], y[b * 8:(b + 1) * 8], 0)
        scales.append(method._s)
    # their train_epoch: s = (smax - 1/smax) * i / len(r) + 1/smax, i the batch's first sample
    want = [(smax - 1 / smax) * (8 * b) / 24 + 1 / smax for b in range(3)]
    assert scales == pytest.approx(want, rel=1e-6)
    with torch.no_grad():  # a unit whose σ(smax·e) is far from 0 and 1
        method.emb.e[0][0][0] = 0.002
    method.after_task(0, *_data(0))
    e0 = [e.detach().clone() for e in method.emb.e[0]]
    mask_pre = [torch.sigmoid(smax * e) for e in e0]  # their mask_pre: model.mask(t, s=smax)

    # evaluation of task 0: their forward(task, x, s=smax): h = relu(fc(h)) * σ(smax·e)
    x, y = _data(1)
    lin0, lin1 = model.trunk[0], model.trunk[2]

    def forward(gates: list[Tensor], head: int) -> Tensor:
        h = F.relu(F.linear(x[:8], lin0.weight, lin0.bias)) * gates[0]
        h = F.relu(F.linear(h, lin1.weight, lin1.bias)) * gates[1]
        return model.heads[head](h)

    with method.eval_context(0), torch.no_grad():
        torch.testing.assert_close(model(x[:8], 0), forward(mask_pre, 0), rtol=1e-5, atol=1e-7)

    # task 1, first batch: s = 1/smax; their criterion and the gradient surgery
    method.before_task(1)
    opt = method.make_optimizer(1, 0.1)
    method.before_epoch(1, 0)
    got = method.training_loss(model, x[:8], y[:8], 1)
    s = 1 / smax
    e1 = list(method.emb.e[1])
    masks = [torch.sigmoid(s * e) for e in e1]
    reg = sum((m * (1 - mp)).sum() for m, mp in zip(masks, mask_pre, strict=True))
    reg = reg / sum((1 - mp).sum() for mp in mask_pre)
    want_loss = F.cross_entropy(forward(masks, 1), y[:8]) + 0.75 * reg
    torch.testing.assert_close(got, want_loss, rtol=1e-5, atol=0)

    named = dict(model.named_parameters())
    names = ["trunk.0.weight", "trunk.0.bias", "trunk.2.weight", "trunk.2.bias",
             "heads.1.weight", "heads.1.bias", "hat.e.1.0", "hat.e.1.1"]
    raw = dict(zip(names, torch.autograd.grad(want_loss, [named[n] for n in names]),
                   strict=True))
    expect = dict(raw)
    # mask_back = 1 - get_view_for(n, mask_pre): min(post, pre) for a weight, post for a bias
    expect["trunk.0.weight"] = raw["trunk.0.weight"] * (1 - mask_pre[0][:, None])
    expect["trunk.0.bias"] = raw["trunk.0.bias"] * (1 - mask_pre[0])
    expect["trunk.2.weight"] = raw["trunk.2.weight"] * (
        1 - torch.minimum(mask_pre[1][:, None], mask_pre[0][None, :]))
    expect["trunk.2.bias"] = raw["trunk.2.bias"] * (1 - mask_pre[1])
    for i, e in enumerate(e1):  # compensation, thres_cosh 50
        comp = smax / s * (torch.cosh(torch.clamp(s * e.detach(), -50, 50)) + 1) / (
            torch.cosh(e.detach()) + 1)
        expect[f"hat.e.1.{i}"] = raw[f"hat.e.1.{i}"] * comp
    total = torch.sqrt(sum((g ** 2).sum() for g in expect.values()))
    if total > 10000:  # clip_grad_norm(model.parameters(), clipgrad=10000)
        expect = {n: g * (10000 / (total + 1e-6)) for n, g in expect.items()}
    opt.zero_grad(set_to_none=True)
    got.backward()
    method.after_backward(1)
    for n in names:
        torch.testing.assert_close(named[n].grad, expect[n], rtol=1e-5, atol=1e-9, msg=n)


# -- finetune / freeze: the BLIP authors' sgd.py and sgd_frozen.py ---------------------------


def _one_step(name: str, task: int) -> tuple[dict[str, Tensor], dict[str, Tensor],
                                             dict[str, Tensor]]:
    """Parameters before and after one step of task ``task`` (after ``task`` earlier tasks),
    and the task loss's gradients at the step's start."""
    model = _mlp()
    method = _fresh(name, model)
    for t in range(task):
        _task(method, t)
    x, y = _data(task)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    params = dict(model.named_parameters())
    grads = dict(zip(params, torch.autograd.grad(F.cross_entropy(model(x[:8], task), y[:8]),
                                                 list(params.values()), allow_unused=True),
                     strict=True))
    method.before_task(task)
    opt = method.make_optimizer(task, 0.1)
    loss = method.training_loss(model, x[:8], y[:8], task)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    method.after_backward(task)
    opt.step()
    after = {n: p.detach().clone() for n, p in model.named_parameters()}
    return before, after, {n: g for n, g in grads.items() if g is not None}


@pytest.mark.parametrize("task", [0, 1])
def test_finetune_step_is_plain_sgd_on_everything(task: int) -> None:
    before, after, grads = _one_step("finetune", task)
    for n in before:  # their SGD(model.parameters(), lr, momentum=0): θ − lr·∇CE(head t)
        want = before[n] - 0.1 * grads[n] if n in grads else before[n]
        torch.testing.assert_close(after[n], want, rtol=1e-5, atol=0, msg=n)
    assert any(n.startswith("trunk") for n in grads)


def test_freeze_trains_only_the_task_head_after_the_first_task() -> None:
    before, after, grads = _one_step("freeze", 1)
    for n in before:  # requires_grad=False outside 'classifier' after task 0
        want = before[n] - 0.1 * grads[n] if n.startswith("heads.1.") else before[n]
        torch.testing.assert_close(after[n], want, rtol=1e-5, atol=0, msg=n)
    assert not torch.equal(after["heads.1.weight"], before["heads.1.weight"])


def test_hat_state_of_an_older_run_still_loads() -> None:
    # blip's earlier HAT state had no "seen_samples": it loads, and the epoch length is
    # learned again at the next epoch's start
    method = _fresh("hat", _mlp())
    _task(method, 0)
    state = method.state_dict()
    assert state["seen_samples"] == 24
    del state["seen_samples"]
    again = _fresh("hat", _mlp())
    again.load_state_dict(state)
    assert again.seen_samples is None and again.seen_batches == state["seen_batches"]
    assert all(torch.equal(a, b) for a, b in zip(again.cum, method.cum, strict=True))
