"""The trainer's step variants (blip/classification/step.py) against the eager step: the
chunked batches, the CUDA-graph step through its CPU stand-in, torch.compile, warm-up."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from blip.classification.data import TaskData
from blip.classification.step import (
    EagerCapture,
    GraphStep,
    batches,
    compiled_step,
    eager_step,
    make_step,
    warm_up,
)
from blip.classification.trainer import TrainConfig, Trainer, preflight
from blip.methods import METHODS, make_method
from blip.models import MLP


def _task(n: int = 37, uint8: bool = True) -> TaskData:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 3, 2, 2), generator=g, dtype=torch.uint8)
    if not uint8:
        x = x.float() / 7
    y = torch.randint(0, 4, (n,), generator=g)
    return TaskData("t", 4, x, y, x, y, x, y, mean=(0.5, 0.4, 0.3), std=(0.2, 0.3, 0.4))


@pytest.mark.parametrize("uint8", [True, False])
@pytest.mark.parametrize("chunk_bytes", [1, 200, 1 << 20])
def test_batches_equal_per_batch_gathering(uint8: bool, chunk_bytes: int) -> None:
    task = _task(uint8=uint8)
    perm = torch.randperm(37, generator=torch.Generator().manual_seed(3))
    got = list(batches(task, task.x_train, task.y_train, perm, 8, chunk_bytes=chunk_bytes))
    want = [(task.inputs(task.x_train[perm[i:i + 8]]), task.y_train[perm[i:i + 8]])
            for i in range(0, 37, 8)]
    assert [len(y) for _, y in got] == [8, 8, 8, 8, 5]  # the short last batch kept
    for (x, y), (wx, wy) in zip(got, want, strict=True):
        assert torch.equal(x, wx) and torch.equal(y, wy)


def _trajectory(method: str, mode: str, lrs: tuple[float, ...] = (0.1, 0.05),
                nan_at: int | None = None) -> tuple[list[float], dict, object, object]:
    """Steps over batches of 8, 8 and 3 samples per lr phase; losses, final state, opt, step."""
    torch.manual_seed(0)
    m = make_method(method, MLP(6, 10, [3, 3]))
    net = m.prepare()
    opt = m.make_optimizer(0, lrs[0])
    step = make_step(mode, m, net, opt, 0, torch.device("cpu"))
    g = torch.Generator().manual_seed(1)
    losses, k = [], 0
    for lr in lrs:
        for group in opt.param_groups:
            group["lr"] = lr
        for n in (8, 8, 3, 8, 3, 8, 3):
            x, y = torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)
            if nan_at == k:
                x[0, 0] = float("nan")
            losses.append(float(step(x, y).detach()))
            k += 1
            if k in (3, 6) and hasattr(step, "flush"):  # as the trainer, after each epoch
                step.flush()
    if hasattr(step, "finish"):
        step.finish()
    return losses, {n: t.clone() for n, t in net.state_dict().items()}, opt, step


@pytest.mark.parametrize("method", ["blip", "finetune"])
def test_graph_step_stand_in_equals_eager(method: str) -> None:
    le, se, _, _ = _trajectory(method, "off")
    lg, sg, _, step = _trajectory(method, "cudagraph")
    assert le == lg
    assert se.keys() == sg.keys() and all(torch.equal(se[k], sg[k]) for k in se)
    # one graph per shape (8 and the short 3) and lr phase; the first batch of each shape
    # ran eagerly (warm-up)
    assert isinstance(step, GraphStep) and step.captures == 4
    assert not step.graphs  # finish() dropped them


def test_graph_step_counts_skipped_nonfinite_like_eager() -> None:
    # a NaN input in a replayed step: the fused step skips the NaN gradient elements of the
    # trunk and the count reaches the optimizer through the graph's running total
    # k=5: an 8-sample batch replayed from the graph captured at k=1, after a flush at k=3
    _, se, opt_e, _ = _trajectory("blip", "off", nan_at=5)
    _, sg, opt_g, _ = _trajectory("blip", "cudagraph", nan_at=5)
    assert opt_e.skipped_nonfinite() > 0
    assert opt_g.skipped_nonfinite() == opt_e.skipped_nonfinite()
    for k in se:  # NaN where eager has NaN (the heads' plain SGD does not skip), else equal
        assert torch.equal(se[k].isnan(), sg[k].isnan()) if se[k].is_floating_point() else True
        assert torch.equal(se[k].nan_to_num(), sg[k].nan_to_num()), k


def test_eager_capture_replays_and_refuses_replay_before_capture() -> None:
    c = EagerCapture()
    with pytest.raises(RuntimeError, match="before capture"):
        c.replay()
    calls = []
    c.capture(lambda: calls.append(1))
    assert calls == []  # capturing runs nothing, as with a CUDA graph
    c.replay()
    c.replay()
    assert calls == [1, 1]


@pytest.mark.parametrize("mode", ["aot_eager", "inductor"])
def test_compiled_equals_eager(mode: str) -> None:
    """aot_eager runs eager's aten kernels, traced once: bit-identical. inductor generates
    its own fused C++ for the elementwise parts (bias+ReLU, log-softmax, their backward),
    summing in another order: equal within float32 rounding (~1e-7 seen), so rtol 1e-5.
    A tiny MLP and 4 steps: an inductor compile takes ~30 s on a loaded 2-core CPU."""
    runs = []
    for variant in ("off", mode):
        torch.manual_seed(0)
        m = make_method("blip", MLP(6, 10, [3]))
        net = m.prepare()
        opt = m.make_optimizer(0, 0.1)
        step = eager_step(m, net, opt, 0) if variant == "off" else \
            compiled_step(m, net, opt, 0, variant)
        g = torch.Generator().manual_seed(1)
        losses = [float(step(torch.randn(5, 6, generator=g),
                             torch.randint(0, 3, (5,), generator=g)).detach())
                  for _ in range(4)]
        runs.append((losses, net.state_dict()))
    (le, se), (lc, sc) = runs
    if mode == "aot_eager":
        assert le == lc
        assert all(torch.equal(se[k], sc[k]) for k in se)
    else:
        assert lc == pytest.approx(le, rel=1e-5)
        for k in se:
            torch.testing.assert_close(sc[k], se[k], rtol=1e-5, atol=1e-6)


def test_trainer_cudagraph_stand_in_run_equals_eager(tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    short = {"n_tasks": 2, "epochs": 2, "batch_size": 64}
    res = {}
    for mode in ("off", "cudagraph"):
        cfg = TrainConfig.from_preset("pdigits", compile=mode, **short)
        res[mode] = Trainer(cfg, tmp_path / mode, quiet=True, plots=False).run()
    assert res["off"]["acc_matrix"] == res["cudagraph"]["acc_matrix"]
    assert [r["best_valid_loss"] for r in res["off"]["tasks"]] == \
        [r["best_valid_loss"] for r in res["cudagraph"]["tasks"]]
    saved = json.loads((tmp_path / "cudagraph" / "results.json").read_text())
    assert saved["config"]["compile"] == "cudagraph"
    assert saved["warmup_seconds"] > 0  # the one-time costs, outside task 0's time


def test_compile_mode_is_checked() -> None:
    with pytest.raises(ValueError, match="compile must be one of"):
        TrainConfig(compile="fast").validate()


def test_cudagraph_refuses_methods_with_own_step_hooks() -> None:
    # EWC adds its penalty in training_loss: a graph would freeze whatever it does on the host
    with pytest.raises(ValueError, match="'ewc' has its own per-step hooks"):
        preflight(TrainConfig(method="ewc", compile="cudagraph"))
    preflight(TrainConfig(method="blip", compile="cudagraph"))  # base hooks: accepted


@pytest.mark.parametrize("method", list(METHODS))
def test_warm_up_runs_for_every_method(method: str) -> None:
    warm_up(method, {}, torch.device("cpu"))


def test_cli_compile_flag() -> None:
    from blip.cli import _parser

    p = _parser()
    assert p.parse_args(["train"]).compile is None  # -> TrainConfig's "off"
    assert p.parse_args(["train", "--compile"]).compile == "inductor"
    assert p.parse_args(["train", "--compile", "cudagraph", "--epochs", "1"]).compile == \
        "cudagraph"
    assert TrainConfig.from_preset("pdigits").compile == "off"
    with pytest.raises(SystemExit):
        p.parse_args(["train", "--compile", "fast"])
