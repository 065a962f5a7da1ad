"""Every benchmark preset pinned to the authors' values, each with its source.

Sources: github.com/Yujun-Shi/BLIP at commit 975e6dbc; ``IC/`` = ``ImageClassification/src/``,
``MI/`` = ``miniImageNetClassification/src/``, ``RL/`` = ``RL/``. README commands are quoted
in the comments. A value the authors do not state is not pinned here (it is ours).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from blip.classification.data.base import TaskData, TaskStream
from blip.classification.presets import PRESETS, get_preset
from blip.classification.trainer import TrainConfig, build_model
from blip.fisher import FISHER_BATCH_SIZE, FISHER_BATCHES

# The authors' schedule: Appr(model, args, lr_patience=5, lr_factor=3, lr_min=1e-4)
# (IC/approaches/blip.py:15, MI/approaches/blip.py:15), --nepochs default 200
# (IC/run_blip.py:27, MI/run_blip.py:30), --momentum 0 (IC/run_blip.py:30; MI: README
# passes --momentum 0.0), NaN loss -> stop the task, restore best (IC/approaches/
# blip.py:67-69, MI/approaches/blip.py:62-64).
SCHEDULE = dict(lr_patience=5, lr_factor=3.0, lr_min=1e-4, epochs=200, momentum=0.0,
                stop_on_nonfinite=True)
# The architecture options at the models' defaults (fc 2048 x --mul, dropout 0.2, the whole
# map averaged) and BatchNorm left in train mode: the authors' nets outside mini-ImageNet.
ARCH_DEFAULTS = dict(fc1_width=None, fc2_width=None, fc_dropout=None, pool_window=None,
                     batchnorm_eval_from_task1=False)


def _check(name: str, arch: str | None = None, **expected: object) -> None:
    p = get_preset(name, arch)
    got = {k: getattr(p, k) for k in expected}
    assert got == expected, f"{name}: {got} != {expected}"


def test_mnist5() -> None:
    # README: run_blip.py --approach blip --experiment mnist5 --lr 0.01 --sbatch 64
    #   --F-prior 1e-15 --nepochs 200
    # q_mlp for mnist5 (IC/run_blip.py:82-83): ONE hidden Linear_Q(784, --ndim) + ReLU
    #   (IC/networks/q_mlp.py:15-18); --ndim default 1200 (IC/run_blip.py:36)
    # Fisher: estimate_fisher(batch_size=100, num_batch=80) (IC/approaches/blip_utils.py)
    _check("mnist5", model="mlp", lr=0.01, batch_size=64, F_prior=1e-15, hidden=1200,
           n_hidden_layers=1, fisher_batches=None, fisher_batch_size=None, **SCHEDULE,
           **ARCH_DEFAULTS)


def test_pmnist() -> None:
    # README and IC/run_mnist.sh:1: --experiment pmnist --lr 0.01 --sbatch 64
    #   --F-prior 1e-15 --nepochs 200; q_mlp as mnist5 (IC/networks/q_mlp.py:15-18)
    _check("pmnist", model="mlp", lr=0.01, batch_size=64, F_prior=1e-15, hidden=1200,
           n_hidden_layers=1, fisher_batches=None, fisher_batch_size=None, **SCHEDULE,
           **ARCH_DEFAULTS)


def test_cifar_alt() -> None:
    # README and IC/run_cifar_alt.sh:1: --experiment cifar --lr 0.05 --sbatch 32
    #   --F-prior 5e-16 --mul 2; q_alexnet (IC/run_blip.py:84-85)
    # convs round(64/128/256 * mul) (IC/networks/q_alexnet.py:21-27); for cifar fc1
    #   Linear_Q(256*mul*s*s, 2048), fc2 Linear_Q(2048, 2048) (q_alexnet.py:39-41), not scaled
    # drop1 = drop2 = Dropout(0.2) (q_alexnet.py:33-34)
    _check("cifar-alt", model="alexnet", lr=0.05, batch_size=32, F_prior=5e-16, width=2.0,
           fisher_batches=None, fisher_batch_size=None, **SCHEDULE,
           **{**ARCH_DEFAULTS, "fc1_width": 2048, "fc2_width": 2048})


def test_mixture5() -> None:
    # README and IC/run_mixture.sh:1: --experiment mixture5 --lr 0.05 --sbatch 32
    #   --F-prior 5e-17 --mul 0.8 --seed 0; q_alexnet
    # fc round(2048*mul) both (IC/networks/q_alexnet.py:36-38) and dropout 0.2
    #   (q_alexnet.py:33-34): the AlexNet defaults
    _check("mixture5", model="alexnet", lr=0.05, batch_size=32, F_prior=5e-17, width=0.8,
           fisher_batches=None, fisher_batch_size=None, **SCHEDULE, **ARCH_DEFAULTS)


def test_miniimagenet_alexnet() -> None:
    # README: run_blip.py --F-prior 5e-16 --lr 0.01 --momentum 0.0 --mul 1 --sbatch 32
    #   --seed 0 --ntasks 20 --arch alexnet
    # Fisher: fisher_loader batch_size=10 (MI/dataloaders/miniimagenet.py, DatasetGen.get);
    #   estimate_fisher breaks after 100 batches, total_data = 1000 (MI/approaches/blip_utils.py)
    # fc1 Linear_Q(256*mul*s*s, 2048), fc2 Linear_Q(2048, 512) (MI/networks/q_alexnet.py:36-37)
    # drop1 Dropout(0.2) after conv1/conv2, drop2 Dropout(0.5) after conv3/fc1/fc2
    #   (MI/networks/q_alexnet.py:33-34, 40-45)
    # BatchNorm2d in eval mode in train_epoch when t > 0 (MI/approaches/blip.py:91-95)
    _check("miniimagenet", model="alexnet", lr=0.01, batch_size=32, F_prior=5e-16, width=1.0,
           fisher_batches=100, fisher_batch_size=10, **SCHEDULE, fc1_width=2048, fc2_width=512,
           fc_dropout=0.5, pool_window=None, batchnorm_eval_from_task1=True)


def test_miniimagenet_resnet() -> None:
    # README: run_blip.py --F-prior 1e-16 --lr 0.01 --momentum 0.0 --mul 1.5 --sbatch 32
    #   --seed 0 --ntasks 20 --arch resnet
    # F.avg_pool2d(out, 4) of the final 6 x 6 map (MI/networks/q_resnet.py:77)
    # BatchNorm2d in eval mode in train_epoch when t > 0 (MI/approaches/blip.py:91-95)
    # the AlexNet options of the benchmark preset do not carry over to the ResNet
    _check("miniimagenet", "resnet18", model="resnet18", lr=0.01, batch_size=32,
           F_prior=1e-16, width=1.5, fisher_batches=100, fisher_batch_size=10, **SCHEDULE,
           fc1_width=None, fc2_width=None, fc_dropout=None, pool_window=4,
           batchnorm_eval_from_task1=True)


def test_atari6_rl_defaults() -> None:
    # RL has no Preset; its defaults are the published ones. RL/run_blip.sh:1-6:
    #   --lr 2.5e-4 --clip-param 0.1 --value-loss-coef 0.5 --num-processes 16 --num-steps 125
    #   --num-mini-batch 8 --use-linear-lr-decay --entropy-coef 0.01 --F-prior 5e-18;
    #   --num-env-steps default 10e6, --gamma 0.99, --gae-lambda 0.95, --ppo-epoch 4,
    #   --max-grad-norm 0.5, --eps 1e-5 (RL/arguments_rl.py)
    from blip.rl.ppo import PPOConfig
    from blip.rl.runner import DEFAULT_STEPS, RLConfig

    ppo, rl = PPOConfig(), RLConfig(suite="atari6")
    assert (ppo.lr, ppo.clip, ppo.vf_coef, ppo.n_steps, ppo.n_minibatches, ppo.ent_coef) == \
        (2.5e-4, 0.1, 0.5, 125, 8, 0.01)
    assert (ppo.gamma, ppo.gae_lambda, ppo.epochs, ppo.max_grad_norm, ppo.adam_eps,
            ppo.anneal_lr) == (0.99, 0.95, 4, 0.5, 1e-5, True)
    assert (rl.envs, rl.F_prior, DEFAULT_STEPS["atari6"]) == (16, 5e-18, 10_000_000)


def test_embedded_presets_keep_training_on_nonfinite() -> None:
    # the NaN stop is the authors'; the embedded streams' published numbers ran without it
    for name in ("pdigits", "digits5", "mnist5k-split", "mnist5k-perm"):
        assert PRESETS[name].stop_on_nonfinite is False, name


def test_mnist_presets_build_one_hidden_layer() -> None:
    # the model the trainer builds from the preset: 784 -> 1200 (ReLU) -> head, as q_mlp
    x = torch.zeros(4, 1, 28, 28, dtype=torch.uint8)
    y = torch.zeros(4, dtype=torch.long)
    stream = TaskStream("mnist5", [TaskData("t0", 2, x, y, x, y, x, y)], (1, 28, 28))
    for name in ("mnist5", "pmnist"):
        net = build_model(TrainConfig.from_preset(name), stream)
        shapes = [tuple(p.shape) for n, p in net.named_parameters() if n.startswith("trunk")]
        assert shapes == [(1200, 784), (1200,)], (name, shapes)


# -- the models the presets build, against the authors' layer lists ----------------------


def _authors_alexnet(ncha: int, size: int, mul: float, experiment: str
                     ) -> tuple[list[tuple[int, ...]], int]:
    """Weight and bias shapes of the authors' q_alexnet trunk and its last_dim, from their
    definitions: convs Conv2d_Q(round(64/128/256*mul), kernel size//8, size//10, 2), each
    followed by max-pool 2 (IC/networks/q_alexnet.py:21-29 = MI/networks/q_alexnet.py:21-29);
    fc per experiment (IC q_alexnet.py:36-41, MI q_alexnet.py:36-37)."""
    c1, c2, c3 = round(64 * mul), round(128 * mul), round(256 * mul)
    k1, k2, k3 = size // 8, size // 10, 2
    s = size
    for k in (k1, k2, k3):  # compute_conv_output_size (stride 1, no padding), then // 2
        s = (s - k + 1) // 2
    fc1, fc2 = {"mixture5": (round(2048 * mul), round(2048 * mul)), "cifar": (2048, 2048),
                "MI": (2048, 512)}[experiment]
    layers = [(c1, ncha, k1, k1), (c1,), (c2, c1, k2, k2), (c2,), (c3, c2, k3, k3), (c3,),
              (fc1, c3 * s * s), (fc1,), (fc2, fc1), (fc2,)]
    return layers, fc2


def _authors_resnet18(ncha: int, mul: float) -> tuple[list[tuple[int, ...]], int]:
    """Conv weight shapes of the authors' q_resnet (bias-free, BatchNorm affine=False: no
    other parameters) and its last_dim int(mul*512) (MI/networks/q_resnet.py: BasicBlock
    conv1/conv2/shortcut :18-31, ResNet stem and layers :51-58, _make_layer :63-69)."""
    layers = [(int(64 * mul), ncha, 3, 3)]
    in_planes = int(64 * mul)
    for base, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        planes = int(base * mul)
        for s in (stride, 1):  # num_blocks [2, 2, 2, 2]
            layers += [(planes, in_planes, 3, 3), (planes, planes, 3, 3)]
            if s != 1 or in_planes != planes:
                layers.append((planes, in_planes, 1, 1))
            in_planes = planes
    return layers, int(mul * 512)


def _stream(shape: tuple[int, ...], classes: int, n: int = 4, tasks: int = 1,
            seed: int = 0) -> TaskStream:
    g = torch.Generator().manual_seed(seed)
    out = []
    for t in range(tasks):
        x = torch.randint(0, 256, (n, *shape), generator=g, dtype=torch.uint8)
        y = torch.arange(n) % classes
        out.append(TaskData(f"t{t}", classes, x, y, x, y, x, y))
    return TaskStream("fake", out, shape)


# preset (and model) -> the authors' net: (input shape, classes, their builder and args)
AUTHORS_NETS = {
    ("cifar-alt", None): ((3, 32, 32), 10, _authors_alexnet, (3, 32, 2, "cifar")),
    ("mixture5", None): ((3, 32, 32), 10, _authors_alexnet, (3, 32, 0.8, "mixture5")),
    ("miniimagenet", None): ((3, 84, 84), 5, _authors_alexnet, (3, 84, 1, "MI")),
    ("miniimagenet", "resnet18"): ((3, 84, 84), 5, _authors_resnet18, (3, 1.5)),
}


@pytest.mark.parametrize(("name", "arch"), sorted(AUTHORS_NETS, key=str))
def test_preset_builds_the_authors_net(name: str, arch: str | None) -> None:
    shape, classes, authors, args = AUTHORS_NETS[(name, arch)]
    want, last_dim = authors(*args)
    net = build_model(TrainConfig.from_preset(name, arch), _stream(shape, classes))
    trunk = [tuple(p.shape) for n, p in net.named_parameters() if not n.startswith("heads")]
    assert trunk == want, name
    assert sum(math.prod(s) for s in trunk) == sum(math.prod(s) for s in want)
    assert net.heads[0].in_features == last_dim
    assert net(torch.zeros(2, *shape), 0).shape == (2, classes)


def test_authors_dropouts_and_pooling_reach_the_models() -> None:
    mi = build_model(TrainConfig.from_preset("miniimagenet"), _stream((3, 84, 84), 5))
    # MI/networks/q_alexnet.py:33-34: drop1 0.2 (conv1, conv2), drop2 0.5 (conv3, fc1, fc2)
    assert (mi.drop.p, mi.drop_fc.p) == (0.2, 0.5)
    for name in ("cifar-alt", "mixture5"):  # IC/networks/q_alexnet.py:33-34: 0.2 and 0.2
        net = build_model(TrainConfig.from_preset(name), _stream((3, 32, 32), 10))
        assert (net.drop.p, net.drop_fc.p) == (0.2, 0.2), name
    res = build_model(TrainConfig.from_preset("miniimagenet", "resnet18"),
                      _stream((3, 84, 84), 5))
    assert res.pool_window == 4  # MI/networks/q_resnet.py:77, avg_pool2d(out, 4)
    # other users of the model keep the whole-map average
    other = build_model(TrainConfig.from_preset("cifar-alt", "resnet18"), _stream((3, 32, 32), 10))
    assert other.pool_window is None


@pytest.mark.parametrize(("name", "bad", "match"), [
    ("cifar-alt", dict(pool_window=4), "pool_window=4 applies to model 'resnet18' only"),
    ("pdigits", dict(fc1_width=2048), "fc1_width=2048 applies to model 'alexnet' only"),
    ("cifar-alt", dict(fc_dropout=1.5), "fc_dropout must be"),
    ("cifar-alt", dict(fc2_width=0), "fc2_width must be"),
    ("miniimagenet", dict(batchnorm_eval_from_task1=1),
     "batchnorm_eval_from_task1 must be True or False"),
])
def test_architecture_options_belong_to_their_model(name: str, bad: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TrainConfig.from_preset(name, **bad).validate()


def test_configs_written_before_the_options_ran_the_defaults() -> None:
    # a results.json / checkpoint of an earlier version lacks the new keys; it ran the
    # models' defaults, so a pdigits run of then still matches a pdigits run of now
    now = TrainConfig.from_preset("pdigits").to_dict()
    old = {k: v for k, v in now.items() if k not in TrainConfig.ARCH_DEFAULTS}
    up = TrainConfig.upgrade(old)
    assert all(up.get(k) == now[k] for k in TrainConfig.RESULT_KEYS)
    # while an old cifar-alt run (fc 4096) does not match today's preset (fc 2048)
    cifar = TrainConfig.from_preset("cifar-alt").to_dict()
    old = {k: v for k, v in cifar.items() if k not in TrainConfig.ARCH_DEFAULTS}
    assert (TrainConfig.upgrade(old)["fc1_width"], cifar["fc1_width"]) == (None, 2048)


def _bn_log(tmp_path: Path, on: bool) -> list[tuple[int, set[bool], bool, bool]]:
    """A 2-task run of the mini-ImageNet ResNet-18 preset (narrow, 2 epochs); per training
    epoch: its task, the BatchNorm modes seen in the forward passes, whether the rest of
    the net trained in train mode, and whether the running statistics stayed unchanged."""
    from blip.classification import trainer as tr
    from blip.modes import batchnorm_layers

    log: list[tuple[int, set[bool], bool, bool]] = []

    class Recording(tr.Trainer):
        def _train_epoch(self, net, method, opt, task, t, epoch, x, y):  # noqa: ANN001, ANN202
            bns = batchnorm_layers(net)
            modes: set[bool] = set()
            rest: set[bool] = set()
            hooks = [m.register_forward_hook(lambda m, i, o: modes.add(m.training)) for m in bns]
            hooks.append(net.conv1.register_forward_hook(lambda m, i, o: rest.add(m.training)))
            before = [(m.running_mean.clone(), m.running_var.clone()) for m in bns]
            steps = super()._train_epoch(net, method, opt, task, t, epoch, x, y)
            for h in hooks:
                h.remove()
            same = all(torch.equal(a, m.running_mean) and torch.equal(b, m.running_var)
                       for (a, b), m in zip(before, bns, strict=True))
            log.append((t, modes, rest == {True}, same))
            return steps

    cfg = TrainConfig.from_preset("miniimagenet", "resnet18", width=1 / 16, epochs=2,
                                  n_tasks=2, threads=1, batchnorm_eval_from_task1=on)
    Recording(cfg, tmp_path / f"bn-{on}", quiet=True, plots=False,
              stream=_stream((3, 84, 84), 5, n=12, tasks=2)).run()
    return log


def test_batchnorm_in_eval_mode_from_task1(tmp_path: Path) -> None:
    # MI/approaches/blip.py:88-95: model.train(), then for t > 0 every BatchNorm2d .eval()
    on = _bn_log(tmp_path, True)
    assert [t for t, *_ in on] == [0, 0, 1, 1]
    for t, modes, rest_train, same in on:
        assert rest_train, t
        if t == 0:
            assert modes == {True} and not same  # task 0 learns the statistics
        else:
            assert modes == {False} and same  # then they normalise and stay
    # off (the model's users elsewhere): BatchNorm trains on every task
    off = _bn_log(tmp_path, False)
    assert all(modes == {True} and not same for _, modes, _, same in off)


def test_fisher_budget_reaches_blip_only() -> None:
    cfg = TrainConfig.from_preset("miniimagenet")
    assert cfg.method_kwargs["fisher_batches"] == 100
    assert cfg.method_kwargs["fisher_batch_size"] == 10
    # the authors' EWC baseline estimates its Fisher its own way (MI/approaches/utils.py,
    # fisher_matrix_diag over the whole train loader): the BLIP budget is not passed on
    ewc = TrainConfig.from_preset("miniimagenet", method="ewc")
    assert "fisher_batches" not in ewc.method_kwargs
    # the other benchmarks keep the library's 80 x 100 (IC/approaches/blip_utils.py)
    assert "fisher_batches" not in TrainConfig.from_preset("pmnist").method_kwargs
    assert (FISHER_BATCHES, FISHER_BATCH_SIZE) == (80, 100)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_is_a_valid_config(name: str) -> None:
    TrainConfig.from_preset(name).validate()


# -- the authors' NaN stop (item 3) and the Fisher samples in results.json --------------


def _poisoned_run(tmp_path: Path, stop: bool, poison_epoch: int = 2) -> dict:
    """pdigits, 1 task, 5 epochs; a head weight turns NaN at the end of ``poison_epoch``."""
    from blip.classification import trainer as tr

    cfg = TrainConfig.from_preset("pdigits", n_tasks=1, epochs=5, threads=1,
                                  stop_on_nonfinite=stop)

    class Poisoned(tr.Trainer):
        def _train_epoch(self, net, method, opt, task, t, epoch, x, y):  # noqa: ANN001, ANN202
            steps = super()._train_epoch(net, method, opt, task, t, epoch, x, y)
            if epoch == poison_epoch:
                with torch.no_grad():
                    net.heads[0].weight[0, 0] = float("nan")
            return steps

    return Poisoned(cfg, tmp_path / f"run-{stop}", quiet=True, plots=False).run()


def test_nonfinite_stop_restores_the_best_epoch(tmp_path: Path) -> None:
    results = _poisoned_run(tmp_path, stop=True)
    rec = results["tasks"][0]
    assert rec["stopped_nonfinite"] == 2 and rec["epochs_run"] == 3
    assert rec["best_epoch"] in (0, 1)  # the poisoned epoch never becomes the best
    assert 0.5 < results["acc_matrix"][0][0] <= 1.0  # the restored, finite model


def test_without_the_stop_training_goes_on(tmp_path: Path) -> None:
    # the fused step skips the NaN gradients of the trunk and says so; training goes on
    with pytest.warns(UserWarning, match="skipped"):
        results = _poisoned_run(tmp_path, stop=False)
    rec = results["tasks"][0]
    assert rec["stopped_nonfinite"] is None and rec["epochs_run"] > 3


def test_results_state_the_fisher_samples_of_a_short_task(tmp_path: Path) -> None:
    from blip.classification.data import load_benchmark
    from blip.classification.trainer import train

    cfg = TrainConfig.from_preset("pdigits", n_tasks=2, epochs=1, threads=1)
    results = train(cfg, tmp_path / "run", quiet=True, plots=False)
    stream = load_benchmark("pdigits", seed=0)
    # pdigits' tasks hold ~1300 training samples, fewer than the 80 x 100 budget: all used
    assert results["fisher_budget"] == FISHER_BATCHES * FISHER_BATCH_SIZE == 8000
    assert results["fisher_samples"] == [len(stream[t].y_train) for t in range(2)]
    assert results["fisher_samples"][0] < results["fisher_budget"]
    # a method without a Fisher budget says so
    ft = train(TrainConfig.from_preset("pdigits", method="finetune", n_tasks=1, epochs=1,
                                       threads=1), tmp_path / "ft", quiet=True, plots=False)
    assert ft["fisher_budget"] is None and ft["fisher_samples"] == [None]


def test_train_cli_sets_the_nonfinite_stop() -> None:
    from blip.cli import _parser

    def flag(*argv: str) -> object:
        return _parser().parse_args(["train", *argv]).stop_on_nonfinite

    # unset: the preset decides (on for pmnist, off for pdigits); either way on request
    assert flag("--benchmark", "pmnist") is None
    assert TrainConfig.from_preset("pmnist", stop_on_nonfinite=None).stop_on_nonfinite is True
    assert TrainConfig.from_preset("pdigits", stop_on_nonfinite=None).stop_on_nonfinite is False
    assert flag("--no-stop-on-nonfinite") is False and flag("--stop-on-nonfinite") is True
    off = TrainConfig.from_preset("pmnist", stop_on_nonfinite=flag("--no-stop-on-nonfinite"))
    assert off.stop_on_nonfinite is False


def test_train_cli_writes_the_nonfinite_stop(tmp_path: Path) -> None:
    import json

    from blip.cli import main

    out = tmp_path / "run"
    assert main(["train", "--benchmark", "pdigits", "--n-tasks", "1", "--epochs", "1",
                 "--threads", "1", "--stop-on-nonfinite", "--out", str(out), "--quiet",
                 "--no-plots"]) == 0
    assert json.loads((out / "results.json").read_text())["config"]["stop_on_nonfinite"] is True


def test_mnist5k_perm_authors() -> None:
    # the authors' pmnist settings (README / IC/run_mnist.sh:1: --lr 0.01 --sbatch 64
    #   --F-prior 1e-15 --nepochs 200; q_mlp Linear_Q(784, --ndim 1200) + ReLU,
    #   IC/networks/q_mlp.py:15-18; their schedule and NaN stop) on the embedded stream
    _check("mnist5k-perm-authors", model="mlp", lr=0.01, batch_size=64, F_prior=1e-15,
           hidden=1200, n_hidden_layers=1, fisher_batches=None, fisher_batch_size=None,
           **SCHEDULE, **ARCH_DEFAULTS)
    pm = get_preset("pmnist")
    mine = get_preset("mnist5k-perm-authors")
    assert {k: v for k, v in mine.to_dict().items() if k not in ("threads", "note")} == \
        {k: v for k, v in pm.to_dict().items() if k not in ("threads", "note")}
    # a benchmark of its own (so `blip compare --benchmark` takes this preset), on the
    # same tensors as mnist5k-perm; blip's BLIP run gets the preset's F_prior
    from blip.classification.data import BENCHMARKS, EMBEDDED

    assert "mnist5k-perm-authors" in BENCHMARKS
    assert EMBEDDED["mnist5k-perm-authors"] is EMBEDDED["mnist5k-perm"]
    cfg = TrainConfig.from_preset("mnist5k-perm-authors", method="blip")
    assert cfg.method_kwargs["F_prior"] == 1e-15 and cfg.benchmark == "mnist5k-perm-authors"
