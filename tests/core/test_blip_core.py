"""Core of the blip package: quantized layers, convert, ConstrainedSGD, Fisher, strategy."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

import blip
import blip_kernels
from blip.fisher import estimate_fisher_
from blip.methods import METHODS, make_method
from blip.models import MLP, AlexNet, ResNet18
from blip.nn import QuantConv2d, QuantLinear, convert, quantized_layers
from blip.optim import ConstrainedSGD, project_model_


def _freeze_random_bits(model: nn.Module, seed: int = 0, high: int = 8) -> None:
    """Give every quantized parameter random frozen bits and sync (as after a task)."""
    g = torch.Generator().manual_seed(seed)
    for _, layer in quantized_layers(model):
        for _, c in layer.constraints():
            c.bits.copy_(torch.randint(0, high, c.bits.shape, generator=g).to(torch.uint8))
        layer.sync_()


# -- layers --------------------------------------------------------------------------------


def test_layer_init_buffers_and_resident_bytes() -> None:
    torch.manual_seed(0)
    lin = QuantLinear(30, 7, F_prior=1e-15)
    conv = QuantConv2d(6, 4, 3, groups=2)
    assert lin.weight_bound == pytest.approx(6 / 30**0.5)
    assert conv.fan_in == 3 * 9 and conv.weight_bound == pytest.approx(6 / 27**0.5)
    for layer in (lin, conv):
        assert layer.weight.abs().max() <= layer.weight_bound
        assert torch.all(layer.bias == 0)
        assert layer.bits_weight.dtype == torch.uint8 and layer.prev_weight.dtype == torch.float32
        assert layer.fisher_weight is None and layer.fisher_bias is None
        n_params = sum(p.numel() for p in layer.parameters())
        resident = sum(b.numel() * b.element_size() for b in layer.buffers())
        assert resident == 9 * n_params
    assert torch.all(lin.fisher_old_weight == torch.tensor(1e-15 * 30, dtype=torch.float32))
    # the transient accumulator exists only between alloc_fisher_ and update_bits_
    lin.alloc_fisher_()
    assert lin.fisher_weight is not None and "fisher_weight" not in lin.state_dict()
    lin.update_bits_(0)
    assert lin.fisher_weight is None
    with pytest.raises(RuntimeError, match="no Fisher estimate"):
        lin.update_bits_(1)


def test_layer_bad_arguments_name_them() -> None:
    with pytest.raises(ValueError, match="max_bit"):
        QuantLinear(3, 2, max_bit=0)
    with pytest.raises(ValueError, match="F_prior"):
        QuantLinear(3, 2, F_prior=-1.0)
    with pytest.raises(ValueError, match="forward_mode"):
        QuantLinear(3, 2, forward_mode="fake")
    with pytest.raises(TypeError, match="layer_kwargs"):
        convert(nn.Sequential(nn.Linear(2, 2)), max_bits=3)
    with pytest.raises(ValueError, match="classes_per_task"):
        MLP(4, 8, [])


def test_quantized_forward_mode_uses_max_bit_grid_and_ste() -> None:
    torch.manual_seed(0)
    layer = QuantLinear(5, 3, forward_mode="quantized", max_bit=4)
    x = torch.randn(2, 5)
    full = torch.full_like(layer.weight, 4, dtype=torch.uint8)
    wq = blip_kernels.quantize(layer.weight, full, layer.weight_bound)
    bq = blip_kernels.quantize(layer.bias, full[:, 0], 1.0)
    out = layer(x)
    torch.testing.assert_close(out, F.linear(x, wq, bq), rtol=0, atol=0)
    out.sum().backward()  # straight-through: d/dW = x summed over rows
    torch.testing.assert_close(layer.weight.grad, x.sum(0).expand(3, 5))


def test_state_buffers_stay_fp32_under_dtype_casts() -> None:
    layer = QuantLinear(4, 3).to(torch.bfloat16)
    assert layer.weight.dtype == torch.bfloat16
    assert layer.prev_weight.dtype == torch.float32
    assert layer.fisher_old_bias.dtype == torch.float32
    assert layer.bits_weight.dtype == torch.uint8
    layer.double()
    assert layer.prev_weight.dtype == torch.float32


def test_capacity_math() -> None:
    model = nn.Sequential(QuantLinear(4, 3), nn.ReLU(), QuantLinear(3, 2, bias=False))
    strategy = blip.BLIP(model, max_bit=20)
    model[0].bits_weight.fill_(10)  # 12 params * 10 bits
    model[0].bits_bias.fill_(20)  # 3 * 20
    model[2].bits_weight[0, 0] = 5  # 6 params
    cap = strategy.capacity()
    assert model[0].capacity() == (180, 15)
    assert cap["layers"]["0"] == pytest.approx(180 / (20 * 15))
    assert cap["layers"]["2"] == pytest.approx(5 / (20 * 6))
    assert cap["overall"] == pytest.approx(185 / (20 * 21))


# -- convert ---------------------------------------------------------------------------------


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
            nn.Conv2d(8, 8, 3, stride=2, padding="valid", groups=2, bias=False),
            nn.ReLU(), nn.Conv2d(8, 6, 3, padding=1, padding_mode="reflect"),
        )
        self.fc = nn.Linear(6 * 7 * 7, 16)
        self.drop = nn.Dropout(0.3)
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x).flatten(1)
        return self.head(self.drop(F.relu(self.fc(h))))


def test_convert_small_cnn_keeps_function_and_respects_exclude() -> None:
    torch.manual_seed(0)
    model = SmallCNN().eval()
    x = torch.randn(4, 3, 16, 16)
    before = model(x)
    ref_weight = model.features[0].weight.clone()
    out = convert(model, exclude=("head",), max_bit=12, F_prior=1e-16)
    assert out is model
    names = dict(quantized_layers(model))
    assert set(names) == {"features.0", "features.3", "features.5", "fc"}
    assert isinstance(model.head, nn.Linear) and not isinstance(model.head, QuantLinear)
    assert isinstance(model.features[1], nn.BatchNorm2d)
    assert names["features.3"].groups == 2 and names["features.5"].padding_mode == "reflect"
    assert names["fc"].max_bit == 12 and names["fc"].F_prior == 1e-16
    assert torch.equal(model.features[0].weight, ref_weight)
    assert not model.training and not model.fc.training
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)
    # idempotent: already-quantized layers are left alone
    fc = model.fc
    convert(model)
    assert model.fc is fc and isinstance(model.head, QuantLinear)


class SeqModel(nn.Module):
    """Non-convertible parts (Embedding, LSTM, MultiheadAttention) next to Linears."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.lstm = nn.LSTM(8, 8, batch_first=True)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.proj = nn.Linear(8, 8)
        self.heads = nn.ModuleList([nn.Linear(8, 3), nn.Linear(8, 4)])

    def forward(self, tokens: torch.Tensor, task: int) -> torch.Tensor:
        h, _ = self.lstm(self.emb(tokens))
        h, _ = self.attn(h, h, h)
        return self.heads[task](F.relu(self.proj(h)).mean(1))


def test_convert_model_with_non_convertible_parts() -> None:
    torch.manual_seed(0)
    model = SeqModel().eval()
    shared = nn.Linear(8, 8)
    model.extra = nn.Sequential(shared, shared)  # one module in two places stays shared
    tokens = torch.randint(0, 20, (3, 5))
    before = model(tokens, 1)
    convert(model, exclude="heads")
    assert [n for n, _ in quantized_layers(model)] == ["proj", "extra.0"]
    assert model.extra[0] is model.extra[1]
    assert type(model.attn.out_proj) is not QuantLinear  # a Linear subclass: left alone
    assert isinstance(model.lstm, nn.LSTM) and isinstance(model.emb, nn.Embedding)
    torch.testing.assert_close(model(tokens, 1), before, rtol=0, atol=0)
    # the strategy works end to end on it (Linear on 3-D input -> sequence Fisher path)
    model.extra = nn.Identity()
    strategy = blip.BLIP(model, F_prior=1e-12)
    stats = strategy.end_task(1, [(tokens, None)] * 2)
    assert stats["fisher_samples"] == 6 and stats["capacity"]["overall"] > 0


# -- ConstrainedSGD ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "hp",
    [
        {"momentum": 0.9, "dampening": 0.1, "weight_decay": 0.0, "nesterov": False},
        {"momentum": 0.9, "dampening": 0.0, "weight_decay": 5e-3, "nesterov": True},
    ],
)
def test_constrained_sgd_matches_sgd_plus_projection(hp: dict) -> None:
    torch.manual_seed(0)
    model_a = MLP(12, 16, [3, 3])
    convert(model_a, exclude=("heads",), max_bit=10)
    _freeze_random_bits(model_a, high=6)
    model_b = copy.deepcopy(model_a)
    opt_a = ConstrainedSGD(model_a, lr=0.3, **hp)
    opt_b = torch.optim.SGD(model_b.parameters(), lr=0.3, **hp)
    g = torch.Generator().manual_seed(1)
    for step in range(50):
        x = torch.randn(32, 12, generator=g)
        y = torch.randint(0, 3, (32,), generator=g)
        for model, opt in ((model_a, opt_a), (model_b, opt_b)):
            opt.zero_grad()
            F.cross_entropy(model(x, step % 2), y).backward()
            opt.step()
        project_model_(model_b)
    for (name, pa), pb in zip(model_a.named_parameters(), model_b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6, msg=name)
    assert opt_a.skipped_nonfinite() == 0
    # the fp32 momentum buffers match torch's too
    for pa, pb in zip(model_a.parameters(), model_b.parameters(), strict=True):
        if hp["momentum"]:
            torch.testing.assert_close(opt_a.state[pa]["momentum_buffer"],
                                       opt_b.state[pb]["momentum_buffer"], rtol=1e-5, atol=1e-6)


def test_constrained_sgd_counts_nonfinite_and_validates() -> None:
    layer = QuantLinear(4, 3)
    model = nn.Sequential(layer)
    opt = ConstrainedSGD(model, lr=0.1, momentum=0.5)
    before = layer.weight.detach().clone()
    layer.weight.grad = torch.zeros_like(layer.weight)
    layer.weight.grad[0, 0] = float("nan")
    layer.bias.grad = torch.zeros_like(layer.bias)
    opt.step()
    assert opt.skipped_nonfinite() == 1
    assert layer.weight[0, 0] == before[0, 0]
    with pytest.raises(TypeError, match="model"):
        ConstrainedSGD(list(model.parameters()), lr=0.1)
    with pytest.raises(ValueError, match="lr"):
        ConstrainedSGD(model, lr=-1.0)
    with pytest.raises(ValueError, match="nesterov"):
        ConstrainedSGD(model, lr=0.1, nesterov=True)


# -- frozen bits ---------------------------------------------------------------------------




def test_constrained_sgd_keeps_step_hooks_profiler_label_and_lr_scheduler() -> None:
    """The step skips torch's hook/profiler wrapper only when nothing listens."""
    layer = QuantLinear(4, 3)
    model = nn.Sequential(layer)
    opt = ConstrainedSGD(model, lr=0.1)
    calls: list[str] = []

    def set_grads() -> None:
        for p in model.parameters():
            p.grad = torch.ones_like(p)

    pre = opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    post = opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
    glob = register_optimizer_step_post_hook(lambda o, a, k: calls.append("global"))
    try:
        set_grads()
        opt.step()
        assert calls == ["pre", "post", "global"]
    finally:
        pre.remove(), post.remove(), glob.remove()
    calls.clear()
    wrapped: list[int] = []  # torch's wrapper calls _optimizer_step_code once per step
    opt._optimizer_step_code = lambda: wrapped.append(1)
    set_grads()
    opt.step()
    assert calls == [] and wrapped == []  # nothing listens: the wrapper is skipped
    handle = opt.register_step_pre_hook(lambda o, a, k: None)
    set_grads()
    opt.step()
    handle.remove()
    assert wrapped == [1]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        set_grads()
        opt.step()
    assert any(e.name == "Optimizer.step#ConstrainedSGD.step" for e in prof.events())
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "lr_scheduler.step() before optimizer.step()"
        set_grads()
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)
def _task_data(seed: int, n: int = 256, d: int = 16, classes: int = 3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    teacher = torch.randn(d, classes, generator=g)
    return x, (x @ teacher).argmax(1)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_frozen_bits_are_preserved(optimizer: str) -> None:
    torch.manual_seed(0)
    model = MLP(16, 32, [3, 3])
    strategy = blip.BLIP(model, F_prior=1e-14, max_bit=20)
    x0, y0 = _task_data(0)
    opt = strategy.optimizer(lr=0.2, momentum=0.9)
    for _ in range(20):
        opt.zero_grad()
        F.cross_entropy(model(x0, 0), y0).backward()
        strategy.step(opt)
    strategy.end_task(0, (x0, y0), generator=torch.Generator().manual_seed(0))
    layers = dict(quantized_layers(model))
    snap = {n: {k: v.clone() for k, v in lay.state_dict().items()} for n, lay in layers.items()}
    assert strategy.capacity()["overall"] > 0.2  # something is frozen
    x1, y1 = _task_data(1)
    opt = (strategy.optimizer(lr=0.5, momentum=0.9) if optimizer == "sgd"
           else torch.optim.Adam(model.parameters(), lr=0.05))
    for _ in range(60):
        opt.zero_grad()
        F.cross_entropy(model(x1, 1), y1).backward()
        strategy.step(opt)  # Adam: step then project_model_
    for name, layer in layers.items():
        for pname, c in layer.constraints():
            prev0 = snap[name][f"prev_{pname}"]
            assert torch.equal(c.prev, prev0) and torch.equal(c.bits, snap[name][f"bits_{pname}"])
            step = c.bound * torch.pow(2.0, -c.bits.float())
            dev = (c.param.detach() - c.prev).abs()
            # section 4's invariant: within one frozen-grid step of prev (+ fp32 rounding)
            assert torch.all(dev <= step * (1 + 1e-6) + 1e-7), f"{name}.{pname}"
            full = c.bits == c.max_bit
            assert torch.all(dev[full] <= c.bound * 2.0**-c.max_bit * 1.001)
            # rounding at the frozen precision lands on prev or an adjacent grid point
            q = blip_kernels.quantize(c.param.detach(), c.bits, c.bound)
            frozen = c.bits > 0
            assert torch.all((q - c.prev).abs()[frozen] <= step[frozen] * 1.001)
            # and where the weight kept to the inner half step, the frozen bits are intact
            inner = frozen & (dev < step * 0.499)
            assert torch.equal(q[inner], c.prev[inner])
            # NB: quantize(w, bits) == prev does NOT hold in general: section 4 allows a
            # whole grid step either side of prev, and training pushes most frozen
            # weights right to that edge (where rounding gives prev ± step).
            assert (dev[frozen] > 0).float().mean() > 0.3  # task 1 did move them


# -- Fisher ----------------------------------------------------------------------------------


def _bruteforce_fisher(model: nn.Module, forward, x_all: torch.Tensor, batch_size: int,
                       seed: int) -> dict[str, torch.Tensor]:
    """Per-sample autograd loop; targets drawn exactly as the estimator draws them."""
    model.eval()
    params = {f"{n}.{pn}": p for n, lay in quantized_layers(model)
              for pn, p in lay.named_parameters()}
    acc = {k: torch.zeros_like(p, dtype=torch.float64) for k, p in params.items()}
    g = torch.Generator().manual_seed(seed)
    for s in range(0, x_all.shape[0], batch_size):
        xb = x_all[s: s + batch_size]
        with torch.no_grad():
            probs = F.softmax(forward(xb), -1)
        yb = torch.multinomial(probs, 1, generator=g).squeeze(-1)
        for i in range(xb.shape[0]):
            # the batch mean (section 7): the actual batch size, also for a short last batch
            loss = F.cross_entropy(forward(xb[i: i + 1]), yb[i: i + 1]) / xb.shape[0]
            grads = torch.autograd.grad(loss, list(params.values()))
            for k, gr in zip(params, grads, strict=True):
                acc[k] += gr.double() ** 2
    return {k: (v / x_all.shape[0]).float() for k, v in acc.items()}


def _check_fisher(model: nn.Module, chunks: list[torch.Tensor], batch_size: int,
                  n_batches: int) -> None:
    x_all = torch.cat(chunks)[: batch_size * n_batches]
    reference = copy.deepcopy(model)
    expected = _bruteforce_fisher(reference, reference, x_all, batch_size, seed=3)
    model.train()  # the estimator must switch to eval itself and restore this
    layers = list(quantized_layers(model))
    n = estimate_fisher_(model, layers, [(c, None) for c in chunks], model,
                         n_batches=n_batches, batch_size=batch_size,
                         generator=torch.Generator().manual_seed(3))
    assert n == x_all.shape[0]
    assert all(m.training for m in model.modules())
    for name, layer in layers:
        for pname in layer.blip_param_names():
            got = getattr(layer, f"fisher_{pname}")
            torch.testing.assert_close(got, expected[f"{name}.{pname}"], rtol=2e-4, atol=1e-12,
                                       msg=f"{name}.{pname}")
        assert layer.weight.grad is None  # no .grad pollution


def test_fisher_matches_bruteforce_mlp() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 12), nn.ReLU(), nn.Dropout(0.5), nn.Linear(12, 9),
                          nn.Tanh(), nn.Linear(9, 4))
    convert(model, exclude=("5",))
    chunks = [torch.randn(10, 10), torch.randn(10, 10), torch.randn(5, 10)]
    # re-batched to 7+7+7 = 21 samples (n_batches=3), the loader's 10/10/5 ignored
    _check_fisher(model, chunks, batch_size=7, n_batches=3)


def test_fisher_matches_bruteforce_cnn() -> None:
    torch.manual_seed(0)
    model = SmallCNN()
    convert(model, exclude=("head",))
    with torch.no_grad():  # non-trivial running stats for the eval-mode BatchNorm
        model.features[1].running_mean.uniform_(-0.5, 0.5)
        model.features[1].running_var.uniform_(0.5, 2.0)
    chunks = [torch.randn(6, 3, 16, 16), torch.randn(5, 3, 16, 16)]
    _check_fisher(model, chunks, batch_size=4, n_batches=5)  # 4+4+3: short last batch


def test_fisher_rejects_layer_called_twice() -> None:
    lin = QuantLinear(4, 4)
    model = nn.Sequential(lin)
    with pytest.raises(ValueError, match="more than once"):
        estimate_fisher_(model, [lin], torch.randn(8, 4), lambda x: lin(lin(x)))
    assert lin.fisher_weight is None  # freed on error


# -- strategy / methods ---------------------------------------------------------------------------


def _train_task(method, model, task: int, x, y, steps: int = 60, lr: float = 0.2) -> None:
    method.before_task(task)
    opt = method.make_optimizer(task, lr)
    model.train()
    g = torch.Generator().manual_seed(task)
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (64,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x[idx], task), y[idx]).backward()
        opt.step()
        method.after_step(task)
    method.after_task(task, x, y)


def _accuracy(model, task: int, x, y) -> float:
    model.eval()
    with torch.no_grad():
        return (model(x, task).argmax(1) == y).float().mean().item()


def test_strategy_state_round_trip_into_fresh_model() -> None:
    torch.manual_seed(0)
    model = MLP(16, 20, [3, 3])
    method = make_method("blip", model, F_prior=1e-14, seed=1)
    model = method.prepare()
    x, y = _task_data(0)
    _train_task(method, model, 0, x, y, steps=10)
    strategy_state = method._blip().state_dict()  # includes the model
    buf = io.BytesIO()
    torch.save({"strategy": strategy_state, "method": method.state_dict()}, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)

    fresh = MLP(16, 20, [3, 3])
    strategy = blip.BLIP(fresh, F_prior=1e-14)
    strategy.load_state_dict(loaded["strategy"])
    assert strategy.tasks_seen == 1 and strategy.capacity() == method._blip().capacity()
    for (k, v), (k2, v2) in zip(model.state_dict().items(), fresh.state_dict().items(),
                                    strict=True):
        assert k == k2 and v.dtype == v2.dtype and torch.equal(v, v2), k
    # the Method's own state (no model inside) round-trips as well
    m2 = make_method("blip", MLP(16, 20, [3, 3]), F_prior=1e-14)
    m2.prepare()
    m2.load_state_dict(loaded["method"])
    assert m2._blip().tasks_seen == 1
    # corrupt bits are refused where they enter
    bad = dict(loaded["strategy"]["model"])
    bad["trunk.0.bits_weight"] = torch.full_like(bad["trunk.0.bits_weight"], 25)
    with pytest.raises(ValueError, match="bits_weight"):
        fresh.load_state_dict(bad)
    with pytest.raises(ValueError, match="max_bit"):
        blip.BLIP(MLP(16, 20, [3, 3]), max_bit=8).load_state_dict(loaded["strategy"])


def test_method_registry_and_freeze() -> None:
    assert {"blip", "finetune", "freeze"} <= set(METHODS)
    with pytest.raises(ValueError, match="unknown method"):
        make_method("nope", MLP(4, 4, [2]))
    with pytest.raises(TypeError, match="F_prior"):
        make_method("finetune", MLP(4, 4, [2]), F_prior=1e-15)
    model = MLP(16, 20, [3, 3])
    method = make_method("freeze", model)
    model = method.prepare()
    x, y = _task_data(0)
    _train_task(method, model, 0, x, y, steps=5)
    trunk = copy.deepcopy(model.trunk.state_dict())
    _train_task(method, model, 1, *_task_data(1), steps=5)
    assert all(torch.equal(v, model.trunk.state_dict()[k]) for k, v in trunk.items())
    assert method.layer_capacity() is None


def test_models_shapes() -> None:
    x = torch.randn(2, 3, 32, 32)
    alex = AlexNet((3, 32, 32), [10, 4], width=0.125)
    assert alex(x, 1).shape == (2, 4)
    res = ResNet18((3, 32, 32), [5, 5], width=0.125)
    assert res(x, 0).shape == (2, 5)
    assert all(not bn.affine for bn in res.modules() if isinstance(bn, nn.BatchNorm2d))
    blip.BLIP(res)
    assert len(list(quantized_layers(res))) == 20 and isinstance(res.heads[0], nn.Linear)
    assert MLP((1, 8, 8), 10, [2])(torch.randn(3, 1, 8, 8), 0).shape == (3, 2)


def test_mini_three_task_run_blip_forgets_less_than_finetune() -> None:
    torch.manual_seed(0)
    tasks = [_task_data(10 + t, n=512, d=16, classes=4) for t in range(3)]
    base = MLP(16, 16, [4, 4, 4])
    forgetting = {}
    for name in ("finetune", "blip"):
        model = copy.deepcopy(base)
        hp = {"F_prior": 1e-15, "seed": 0} if name == "blip" else {}
        method = make_method(name, model, **hp)
        model = method.prepare()
        first = []
        for t, (x, y) in enumerate(tasks):
            _train_task(method, model, t, x, y, steps=60, lr=0.5)
            first.append(_accuracy(model, t, x, y))
        final = [_accuracy(model, t, x, y) for t, (x, y) in enumerate(tasks)]
        forgetting[name] = sum(f - e for f, e in zip(first[:-1], final[:-1], strict=True)) / 2
        if name == "blip":
            assert 0 < method.layer_capacity()["trunk.0"] <= 1
            hist = method.bits_histograms()["trunk.0"]
            assert len(hist) == 21 and sum(hist) == 16 * 16 + 16
            assert min(first) > 0.45  # later tasks still learn (chance is 0.25)
    assert forgetting["finetune"] > 0.1, forgetting
    assert forgetting["blip"] < forgetting["finetune"] / 3, forgetting
    assert forgetting["blip"] < 0.02, forgetting
