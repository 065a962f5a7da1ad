"""The fused (autograd-free) training step: bit-identical to the eager step, step by step
and over whole pdigits runs, and used only where it applies."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from blip.classification.fused_step import FusedStep, unsupported
from blip.classification.step import COMPILE_MODES, eager_step, make_step
from blip.classification.trainer import TrainConfig, Trainer
from blip.methods import make_method
from blip.models import MLP, AlexNet
from blip.runs import checkpoint as ckpt

CPU = torch.device("cpu")


def _pair(method: str, model: nn.Module, task: int, lr: float = 0.1, **hp: float):
    """Two identical (method, net, optimizer) setups for ``task``: eager and fused."""
    m = make_method(method, model, **hp)
    m.prepare()
    twins = []
    for _ in range(2):
        mc = copy.deepcopy(m)
        for t in range(task + 1):
            mc.before_task(t)  # e.g. freeze's requires_grad_(False) from task 1 on
        twins.append((mc, mc.model, mc.make_optimizer(task, lr)))
    (me, ne, oe), (mf, nf, of) = twins
    return (eager_step(me, ne, oe, task), ne, oe), (FusedStep(mf, nf, of, task), nf, of)


def _batches(n_in: int, classes: int, sizes: list[int], seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, n_in, generator=g), torch.randint(0, classes, (b,), generator=g))
            for b in sizes]


def _assert_same(ne: nn.Module, nf: nn.Module, oe: torch.optim.Optimizer,
                 of: torch.optim.Optimizer) -> None:
    se, sf = ne.state_dict(), nf.state_dict()  # weights and BLIP buffers (prev, bits)
    assert se.keys() == sf.keys()
    for k in se:
        assert torch.equal(se[k], sf[k]), k
    for (n, pe), pf in zip(ne.named_parameters(), nf.parameters(), strict=True):
        assert (pe.grad is None) == (pf.grad is None), n
        if pe.grad is not None:
            assert torch.equal(pe.grad, pf.grad), n
        be = oe.state.get(pe, {}).get("momentum_buffer")
        bf = of.state.get(pf, {}).get("momentum_buffer")
        assert (be is None) == (bf is None), n
        if be is not None:
            assert torch.equal(be, bf), n


# odd shapes, batch 1 and a short last batch; 1 and 2 hidden layers; momentum, weight decay
CASES = [
    ("blip", dict(n_in=5, hidden=13, classes=[3, 7], layers=1, task=1), {}),
    ("blip", dict(n_in=64, hidden=100, classes=[10, 10], layers=1, task=0),
     {"momentum": 0.9, "weight_decay": 1e-3}),
    ("blip", dict(n_in=7, hidden=11, classes=[5], layers=2, task=0), {"momentum": 0.5}),
    ("finetune", dict(n_in=9, hidden=6, classes=[4, 2], layers=2, task=1),
     {"momentum": 0.9, "weight_decay": 5e-4}),
    ("finetune", dict(n_in=3, hidden=17, classes=[2], layers=1, task=0), {}),
    ("freeze", dict(n_in=6, hidden=8, classes=[3, 4], layers=2, task=1), {"momentum": 0.9}),
    ("freeze", dict(n_in=6, hidden=8, classes=[3, 4], layers=1, task=0), {}),
]


@pytest.mark.parametrize(("method", "shape", "hp"), CASES)
def test_fused_step_is_bit_identical_to_eager(method: str, shape: dict, hp: dict) -> None:
    torch.manual_seed(0)
    model = MLP(shape["n_in"], shape["hidden"], shape["classes"], shape["layers"])
    t = shape["task"]
    (se, ne, oe), (sf, nf, of) = _pair(method, model, t, **hp)
    sizes = [16, 1, 16, 3, 16, 16, 7] * 6  # batch 1, odd batches, a short last batch
    for x, y in _batches(shape["n_in"], shape["classes"][t], sizes):
        le, lf = se(x, y), sf(x, y)
        assert torch.equal(le.detach(), lf), "loss"
        _assert_same(ne, nf, oe, of)
    # the steps did train something (the comparison is not of two idle models)
    assert not torch.equal(model.heads[t].weight, nf.heads[t].weight)


def test_fused_step_head_without_bias_and_grads_outside_the_optimizer() -> None:
    """A bias-free head (mm, not addmm) and trunk parameters that require a gradient but are
    not in the optimizer: autograd accumulates their .grad over the steps; so does fused."""
    torch.manual_seed(0)
    model = MLP(5, 9, [4])
    model.heads[0] = nn.Linear(9, 4, bias=False)
    nets = [copy.deepcopy(model) for _ in range(2)]
    steps = []
    for i, net in enumerate(nets):
        m = make_method("finetune", net)
        opt = torch.optim.SGD(net.heads.parameters(), lr=0.1)
        steps.append(eager_step(m, net, opt, 0) if i == 0 else FusedStep(m, net, opt, 0))
    for x, y in _batches(5, 4, [8, 8, 3]):
        for s in steps:
            s(x, y)
    (ne, nf) = nets
    for (n, pe), pf in zip(ne.named_parameters(), nf.parameters(), strict=True):
        assert torch.equal(pe, pf), n
        assert torch.equal(pe.grad, pf.grad), n
    assert ne.trunk[0].weight.grad is not None  # accumulated, never zeroed


def _ddp_wrapped(tmp_path: Path, net: nn.Module) -> nn.Module:
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0,
                            world_size=1)
    return nn.parallel.DistributedDataParallel(net)


def test_unsupported_names_what_keeps_the_eager_step(tmp_path: Path) -> None:
    torch.manual_seed(0)
    mlp = MLP(4, 6, [3, 3])
    assert unsupported(make_method("blip", copy.deepcopy(mlp)), mlp, 0) is None
    blip_q = make_method("blip", copy.deepcopy(mlp), forward_mode="quantized")
    cases = [
        (make_method("ewc", mlp), mlp, 0, "own per-step hooks"),
        (make_method("finetune", mlp), mlp, 2, "task 2 has no head"),
        (blip_q, blip_q.prepare(), 0, "forward_mode='quantized'"),
        (make_method("finetune", AlexNet((3, 16, 16), [2])), AlexNet((3, 16, 16), [2]), 0,
         "not a blip.models.MLP"),
    ]
    dropout = copy.deepcopy(mlp)
    dropout.trunk.append(nn.Dropout(0.5))
    cases.append((make_method("finetune", dropout), dropout, 0, "trunk.2 is a Dropout"))
    hooked = copy.deepcopy(mlp)
    hooked.trunk[1].register_forward_hook(lambda *a: None)
    cases.append((make_method("finetune", hooked), hooked, 0, "'trunk.1' has hooks"))
    tensor_hook = copy.deepcopy(mlp)
    tensor_hook.heads[0].bias.register_hook(lambda g: g)
    cases.append((make_method("finetune", tensor_hook), tensor_hook, 0,
                  "'heads.0.bias' has hooks"))
    frozen = copy.deepcopy(mlp)
    frozen.requires_grad_(False)
    cases.append((make_method("finetune", frozen), frozen, 0, "requires a gradient"))
    for method, net, t, why in cases:
        reason = unsupported(method, net, t)
        assert reason is not None and why in reason, (why, reason)
        step = make_step("off", method, net, torch.optim.SGD(net.parameters(), 0.1), t, CPU)
        assert not isinstance(step, FusedStep)
        with pytest.raises(ValueError, match="does not apply"):
            FusedStep(method, net, torch.optim.SGD(net.parameters(), 0.1), t)
    # a global module hook sees every module call: eager
    handle = nn.modules.module.register_module_forward_hook(lambda *a: None)
    try:
        assert "global module hooks" in unsupported(make_method("finetune", mlp), mlp, 0)
    finally:
        handle.remove()
    # under DistributedDataParallel (distributed runs) the step stays on autograd
    import torch.distributed as dist

    ddp = _ddp_wrapped(tmp_path, copy.deepcopy(mlp))
    try:
        assert "DistributedDataParallel" in unsupported(make_method("finetune", ddp), ddp, 0)
    finally:
        dist.destroy_process_group()


def test_a_distributed_run_of_several_ranks_stays_on_autograd(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Even with the bare model (DDP's gradient all-reduce lives in autograd hooks); one
    rank alone (world size 1) is fused as usual. Two ranks are simulated: the predicate
    reads only is_initialized and get_world_size."""
    import torch.distributed as dist

    torch.manual_seed(0)
    mlp = MLP(4, 6, [3])
    method = make_method("finetune", mlp)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 1)
    assert unsupported(method, mlp, 0) is None
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    assert "several ranks" in unsupported(method, mlp, 0)
    # make_step builds the DDP-sharded autograd step there (classification/ddp.py), which
    # needs a real group: stand in for it (tests/classification/test_distributed_train.py
    # runs it on 2 real ranks)
    from blip.classification import ddp

    monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
    monkeypatch.setattr(ddp, "sharded_loss", lambda m, net, t, device: (
        lambda x, y: m.training_loss(net, x, y, t)))
    step = make_step("off", method, mlp, torch.optim.SGD(mlp.parameters(), 0.1), 0, CPU)
    assert not isinstance(step, FusedStep)


def test_make_step_modes() -> None:
    assert "eager" in COMPILE_MODES and "off" in COMPILE_MODES
    torch.manual_seed(0)
    m = make_method("blip", MLP(4, 6, [3]))
    net = m.prepare()
    opt = m.make_optimizer(0, 0.1)
    assert isinstance(make_step("off", m, net, opt, 0, CPU), FusedStep)
    assert not isinstance(make_step("eager", m, net, opt, 0, CPU), FusedStep)
    from blip.cli import _parser

    assert _parser().parse_args(["train", "--compile", "eager"]).compile == "eager"
    assert TrainConfig.from_preset("pdigits", compile="eager").validate() is None


@pytest.mark.parametrize(("method", "hp"), [("blip", {}), ("finetune", {}), ("freeze", {}),
                                            ("blip", {"momentum": 0.9})])
def test_whole_pdigits_run_fused_equals_eager(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              method: str, hp: dict) -> None:
    """The trainer's default ("off": fused where it applies) against --compile eager: same
    accuracy matrix, validation losses, bits, capacity and final weights and BLIP buffers."""
    calls = []
    fb = FusedStep._forward_backward

    def counted(self: FusedStep, x: torch.Tensor, y: torch.Tensor):  # noqa: ANN202
        calls.append(1)
        return fb(self, x, y)

    monkeypatch.setattr(FusedStep, "_forward_backward", counted)
    short = {"n_tasks": 3, "epochs": 3, "batch_size": 50}
    res = {}
    for mode in ("eager", "off"):
        cfg = TrainConfig.from_preset("pdigits", method=method, compile=mode, **short,
                                      momentum=hp.get("momentum"))
        res[mode] = Trainer(cfg, tmp_path / mode, quiet=True, plots=False).run()
        if mode == "eager":
            assert not calls
    steps = sum(r["steps"] for r in res["off"]["tasks"])
    assert len(calls) == steps > 0  # every step of the default run was the fused one
    e, f = res["eager"], res["off"]
    for key in ("acc_matrix", "bits_hist", "capacity"):
        assert e[key] == f[key], key
    assert [r["best_valid_loss"] for r in e["tasks"]] == \
        [r["best_valid_loss"] for r in f["tasks"]]
    me = ckpt.load(tmp_path / "eager" / "checkpoint.pt")["model"]
    mf = ckpt.load(tmp_path / "off" / "checkpoint.pt")["model"]
    assert me.keys() == mf.keys()
    for k in me:
        assert torch.equal(me[k], mf[k]), k


# -- review: cases the predicate once let through and computed differently from eager ----

def _run_both(model: nn.Module, batches: list, params=None) -> tuple[nn.Module, nn.Module]:  # noqa: ANN001
    """``model`` trained by the eager and the fused step on ``batches`` (finetune, SGD over
    ``params(net)``, default all); the fused one is asserted to be a FusedStep."""
    nets = [copy.deepcopy(model) for _ in range(2)]
    for i, net in enumerate(nets):
        m = make_method("finetune", net)
        opt = torch.optim.SGD(net.parameters() if params is None else params(net), lr=0.1)
        step = eager_step(m, net, opt, 0) if i == 0 else FusedStep(m, net, opt, 0)
        for x, y in batches:
            step(x.clone(), y)
    return nets[0], nets[1]


def _assert_nets_equal(ne: nn.Module, nf: nn.Module) -> None:
    for (n, pe), pf in zip(ne.named_parameters(), nf.parameters(), strict=True):
        assert torch.equal(pe, pf), n
        assert (pe.grad is None) == (pf.grad is None), n
        if pe.grad is not None:
            assert torch.equal(pe.grad, pf.grad), n


def test_a_layer_used_several_times_accumulates_its_gradient_as_autograd() -> None:
    """One Linear three times in the trunk, its parameters outside the optimizer (their
    .grad accumulates over steps): autograd sums the three contributions first, then adds
    the sum to .grad; adding them to .grad one by one rounds differently."""
    torch.manual_seed(0)
    model = MLP(6, 6, [3])
    lin = model.trunk[0]
    model.trunk = nn.Sequential(lin, nn.ReLU(), lin, nn.ReLU(), lin, nn.ReLU())
    ne, nf = _run_both(model, _batches(6, 3, [8] * 20), lambda n: n.heads.parameters())
    _assert_nets_equal(ne, nf)
    assert ne.trunk[0].weight.grad is not None


def test_a_column_major_weight_keeps_the_eager_step() -> None:
    """autograd's weight gradient follows the weight's layout (mm(a.t(), g).t() for a
    transposed-storage weight); the fused step's mm(g.t(), a) would change the bits."""
    torch.manual_seed(0)
    model = MLP(6, 5, [3])
    for m in (model.trunk[0], model.heads[0]):
        m.weight = nn.Parameter(m.weight.detach().t().contiguous().t())
    assert not model.trunk[0].weight.is_contiguous()
    assert "layout" in unsupported(make_method("finetune", model), model, 0)
    step = make_step("off", make_method("finetune", model), model,
                     torch.optim.SGD(model.parameters(), 0.1), 0, CPU)
    assert not isinstance(step, FusedStep)


def test_overridden_forward_on_an_instance_keeps_the_eager_step() -> None:
    """A forward / features replaced on the model or a layer object (not its class) is what
    eager calls; the fused plan would ignore it."""
    torch.manual_seed(0)
    base = MLP(4, 6, [3])
    net = copy.deepcopy(base)
    net.features = lambda x: net.trunk(2 * x.reshape(x.shape[0], -1))
    layer = copy.deepcopy(base)
    lin = layer.trunk[0]
    lin.forward = lambda x: torch.nn.functional.linear(x, 2 * lin.weight, lin.bias)
    top = copy.deepcopy(base)
    top.forward = lambda x, t: top.heads[t](top.features(x)) * 2
    for m, where in ((net, "'features'"), (layer, "'trunk.0'"), (top, "'forward'")):
        reason = unsupported(make_method("finetune", m), m, 0)
        assert reason is not None and where in reason, (where, reason)


def test_anomaly_detection_keeps_the_eager_step() -> None:
    """Under torch.autograd.detect_anomaly eager raises on a NaN gradient; the fused step
    has no autograd to check it, so the predicate keeps the eager step."""
    torch.manual_seed(0)
    mlp = MLP(4, 6, [3])
    with torch.autograd.detect_anomaly(check_nan=True):
        assert "anomaly" in unsupported(make_method("finetune", mlp), mlp, 0)
    assert unsupported(make_method("finetune", mlp), mlp, 0) is None


def test_probability_targets_and_grad_mode_off_behave_as_eager() -> None:
    """Class probabilities as targets (F.cross_entropy's soft labels) train as eager does;
    under torch.no_grad the step raises autograd's error, as eager does."""
    torch.manual_seed(0)
    model = MLP(5, 7, [3])
    g = torch.Generator().manual_seed(3)
    soft = [(torch.randn(8, 5, generator=g), torch.softmax(torch.randn(8, 3, generator=g), 1))
            for _ in range(5)]
    ne, nf = _run_both(model, soft)
    _assert_nets_equal(ne, nf)
    assert not torch.equal(model.heads[0].weight, nf.heads[0].weight)
    m = make_method("finetune", copy.deepcopy(model))
    step = FusedStep(m, m.model, torch.optim.SGD(m.model.parameters(), 0.1), 0)
    before = copy.deepcopy(m.model.state_dict())
    x, y = _batches(5, 3, [4])[0]
    with torch.no_grad(), pytest.raises(RuntimeError, match="does not require grad"):
        step(x, y)
    assert all(torch.equal(v, m.model.state_dict()[k]) for k, v in before.items())


def test_an_input_that_requires_grad_gets_its_gradient_as_in_eager() -> None:
    torch.manual_seed(0)
    model = MLP(5, 7, [3])
    x, y = _batches(5, 3, [6])[0]
    grads = []
    for i in range(2):
        m = make_method("finetune", copy.deepcopy(model))
        opt = torch.optim.SGD(m.model.parameters(), 0.1)
        step = eager_step(m, m.model, opt, 0) if i == 0 else FusedStep(m, m.model, opt, 0)
        xi = x.clone().requires_grad_(True)
        step(xi, y)
        grads.append(xi.grad)
    assert grads[0] is not None and grads[1] is not None
    assert torch.equal(grads[0], grads[1])
