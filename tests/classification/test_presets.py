"""Every benchmark preset pinned to the authors' values, each with its source.

Sources: github.com/Yujun-Shi/BLIP at commit 975e6dbc; ``IC/`` = ``ImageClassification/src/``,
``MI/`` = ``miniImageNetClassification/src/``, ``RL/`` = ``RL/``. README commands are quoted
in the comments. A value the authors do not state is not pinned here (it is ours).
"""

from __future__ import annotations

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
           n_hidden_layers=1, fisher_batches=None, fisher_batch_size=None, **SCHEDULE)


def test_pmnist() -> None:
    # README and IC/run_mnist.sh:1: --experiment pmnist --lr 0.01 --sbatch 64
    #   --F-prior 1e-15 --nepochs 200; q_mlp as mnist5 (IC/networks/q_mlp.py:15-18)
    _check("pmnist", model="mlp", lr=0.01, batch_size=64, F_prior=1e-15, hidden=1200,
           n_hidden_layers=1, fisher_batches=None, fisher_batch_size=None, **SCHEDULE)


def test_cifar_alt() -> None:
    # README and IC/run_cifar_alt.sh:1: --experiment cifar --lr 0.05 --sbatch 32
    #   --F-prior 5e-16 --mul 2; q_alexnet (IC/run_blip.py:84-85)
    _check("cifar-alt", model="alexnet", lr=0.05, batch_size=32, F_prior=5e-16, width=2.0,
           fisher_batches=None, fisher_batch_size=None, **SCHEDULE)


def test_mixture5() -> None:
    # README and IC/run_mixture.sh:1: --experiment mixture5 --lr 0.05 --sbatch 32
    #   --F-prior 5e-17 --mul 0.8 --seed 0; q_alexnet
    _check("mixture5", model="alexnet", lr=0.05, batch_size=32, F_prior=5e-17, width=0.8,
           fisher_batches=None, fisher_batch_size=None, **SCHEDULE)


def test_miniimagenet_alexnet() -> None:
    # README: run_blip.py --F-prior 5e-16 --lr 0.01 --momentum 0.0 --mul 1 --sbatch 32
    #   --seed 0 --ntasks 20 --arch alexnet
    # Fisher: fisher_loader batch_size=10 (MI/dataloaders/miniimagenet.py, DatasetGen.get);
    #   estimate_fisher breaks after 100 batches, total_data = 1000 (MI/approaches/blip_utils.py)
    _check("miniimagenet", model="alexnet", lr=0.01, batch_size=32, F_prior=5e-16, width=1.0,
           fisher_batches=100, fisher_batch_size=10, **SCHEDULE)


def test_miniimagenet_resnet() -> None:
    # README: run_blip.py --F-prior 1e-16 --lr 0.01 --momentum 0.0 --mul 1.5 --sbatch 32
    #   --seed 0 --ntasks 20 --arch resnet
    _check("miniimagenet", "resnet18", model="resnet18", lr=0.01, batch_size=32,
           F_prior=1e-16, width=1.5, fisher_batches=100, fisher_batch_size=10, **SCHEDULE)


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
