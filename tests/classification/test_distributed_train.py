"""The distributed trainer on 2 gloo ranks (CPU): equal to a 1-process run with the same
global batch, sharded evaluation, kill-and-resume, every method run or refused.

Why a tolerance between 1 and 2 processes: the 2-rank gradient is the sum of two partial
matmuls (each rank's rows) where one process does one matmul over the whole batch, so the
weights agree to rounding, not bitwise, and an argmax over near-tied logits may go the other
way. The frozen bits, integers derived from the Fisher, are asserted identical.
Spawning costs ~2-4 s per process: the module spawns four times and checks much per spawn.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from _spawn import run_ranks

from blip.classification import ddp
from blip.classification.data import load_benchmark
from blip.classification.trainer import TrainConfig, Trainer, train
from blip.distributed import StateMismatchError, checksum, world
from blip.methods import METHODS, method_class
from blip.runs import checkpoint as ckpt

REPO = Path(__file__).resolve().parents[2]
SHORT = {"n_tasks": 3, "epochs": 2}
# accuracy of one entry may differ by this many test samples between 1 and 2 processes
ACC_TOL_SAMPLES = 2


def _cfg(**kw: Any) -> TrainConfig:
    return TrainConfig.from_preset("pdigits", **{**SHORT, **kw})


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same short pdigits run on 1 process (in this one) and on 2 ranks through the
    CLI's --nproc (torchrun's agent)."""
    root = tmp_path_factory.mktemp("dtrain")
    train(_cfg(), root / "one", quiet=True, plots=False)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get(
        "PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-m", "blip", "train", "--nproc", "2", "--n-tasks",
                        str(SHORT["n_tasks"]), "--epochs", str(SHORT["epochs"]), "--out",
                        str(root / "two"), "--no-plots", "--quiet"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return {"one": root / "one", "two": root / "two", "root": root}


def _results(d: Path) -> dict:
    return json.loads((d / "results.json").read_text())


def test_two_ranks_match_one_process(runs: dict[str, Path]) -> None:
    one, two = _results(runs["one"]), _results(runs["two"])
    assert (one["world_size"], one["dist_backend"]) == (1, None)
    assert (two["world_size"], two["dist_backend"]) == (2, "gloo")
    assert two["complete"] and two["tasks_done"] == SHORT["n_tasks"]
    stream = load_benchmark("pdigits", seed=0)
    for t, (a, b) in enumerate(zip(one["acc_matrix"], two["acc_matrix"], strict=True)):
        for u in range(t + 1):
            tol = ACC_TOL_SAMPLES / len(stream[u].y_test)
            assert abs(a[u] - b[u]) <= tol, (t, u, a[u], b[u])
    m1 = ckpt.load(runs["one"] / "checkpoint.pt")["model"]
    m2 = ckpt.load(runs["two"] / "checkpoint.pt")["model"]
    bits = [k for k in m1 if "bits_" in k]
    assert bits, "a BLIP model has bits buffers"
    for k in bits:
        assert torch.equal(m1[k], m2[k]), k
    for k in m1:
        if m1[k].is_floating_point():
            torch.testing.assert_close(m2[k], m1[k], rtol=1e-4, atol=1e-6, msg=k)


def test_only_rank_zero_writes(runs: dict[str, Path], per_method: list[dict]) -> None:
    # each rank was given its own directory: only rank 0's exists, with the usual files
    assert per_method[0]["own_dir"] == sorted(p.name for p in runs["one"].iterdir())
    assert per_method[1]["own_dir"] is None
    assert not [p for p in runs["two"].iterdir() if p.name.endswith(".tmp")]


# -- kill a rank after task 1's checkpoint, resume ------------------------------------------


class _KillRank:
    """Rank ``rank`` SIGKILLs itself at its first validation of task 2: both ranks joined
    that validation's all-reduce, so rank 0 had written task 1's checkpoint before."""

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def on_epoch(self, t: int, *_: Any) -> None:
        if t == 2 and world()[0] == self.rank:
            os.kill(os.getpid(), signal.SIGKILL)


def _train_ranks(out: str, resume: bool, kill: int | None) -> list:
    r = train(_cfg(), out, resume=resume, quiet=True, plots=False,
              hooks=[] if kill is None else [_KillRank(kill)])
    return r["acc_matrix"]


@pytest.mark.parametrize("killed", [0, 1])
def test_kill_and_resume_equals_uninterrupted(runs: dict[str, Path], killed: int) -> None:
    # rank 0 (the writer) or rank 1: README says a run killed on any rank resumes (~6 s each)
    out = runs["root"] / f"killed{killed}"
    for d in (f"k{killed}a", f"k{killed}b"):
        (runs["root"] / d).mkdir()
    with pytest.raises(mp.ProcessExitedException, match="SIGKILL"):
        run_ranks(_train_ranks, runs["root"] / f"k{killed}a", str(out), False, killed)
    assert ckpt.load(out / "checkpoint.pt")["task"] == 1
    assert _results(out)["tasks_done"] == 2
    resumed = run_ranks(_train_ranks, runs["root"] / f"k{killed}b", str(out), True, None)
    uninterrupted = _results(runs["two"])["acc_matrix"]
    assert resumed[0] == resumed[1] == uninterrupted
    assert _results(out)["acc_matrix"] == uninterrupted


# -- every method, sharded evaluation -------------------------------------------------------


class _Keep(Trainer):
    """Keeps the run's network and method to checksum them afterwards."""

    def learn_task(self, net: Any, method: Any, *args: Any) -> Any:
        self.kept = (net, method)
        return super().learn_task(net, method, *args)


class _DivergeRank1(Trainer):
    """Rank 1 nudges one weight of head 0 after training task 0, before the task's end."""

    def train_task(self, net: Any, method: Any, task: Any, t: int) -> dict:
        info = super().train_task(net, method, task, t)
        if world()[0] == 1:
            with torch.no_grad():
                net.heads[0].weight[0, 0] += 1e-3
        return info


def _state_sums(net: torch.nn.Module, method: Any) -> dict[str, list[int]]:
    named = {f"model.{k}": v for k, v in net.state_dict().items()}
    state = getattr(method, "distributed_state", None)
    extra = state() if state is not None else {
        k: v for k, v in method.state_dict().items() if isinstance(v, torch.Tensor)}
    named.update({f"method.{k}": v for k, v in extra.items()})
    return {k: checksum(v).tolist() for k, v in named.items()}


class _CountRows(torch.nn.Module):
    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net, self.rows = net, 0

    def forward(self, x: torch.Tensor, t: int) -> torch.Tensor:
        self.rows += len(x)
        return self.net(x, t)


def _sharded_grads() -> dict[int, dict[str, Any]]:
    """The gradient of a global batch of 5 rows (3 + 2 on the ranks) and of 1 row (rank 1's
    share empty) through ddp.sharded_loss, against the full batch's on one process."""
    from blip.methods import make_method
    from blip.models import MLP

    torch.manual_seed(0)
    method = make_method("finetune", MLP(6, 8, [3, 3]))
    net = method.prepare()
    x, y = torch.randn(5, 6), torch.randint(0, 3, (5,))
    out: dict[int, dict[str, Any]] = {}
    for n in (5, 1):
        sharded = ddp.sharded_loss(method, net, 0, torch.device("cpu"))
        grads = []
        for loss in (sharded, lambda xb, yb: torch.nn.functional.cross_entropy(net(xb, 0), yb)):
            net.zero_grad(set_to_none=True)
            loss(x[:n], y[:n]).backward()
            grads.append({k: p.grad.clone() for k, p in net.named_parameters()
                          if p.grad is not None})
        got, ref = grads
        out[n] = {"names": sorted(got) == sorted(ref),
                  "diff": max(float((got[k] - ref[k]).abs().max()) for k in ref)}
    return out


def _rows_counted() -> dict[str, int]:
    """What EWC (its Fisher's batch size) and HAT (its schedule's sample count) counted of
    one 1-row batch: on 2 ranks through ddp.sharded_loss, where rank 1 forwards a stand-in
    row; on one process through the method's loss."""
    from blip.methods import make_method
    from blip.models import MLP

    out: dict[str, int] = {}
    for name, hp in (("ewc", {}), ("hat", {"batches_per_epoch": 1})):
        torch.manual_seed(0)
        method = make_method(name, MLP(6, 8, [3]), **hp)
        net = method.prepare()
        method.before_task(0)
        x, y = torch.randn(1, 6), torch.randint(0, 3, (1,))
        loss = (ddp.sharded_loss(method, net, 0, torch.device("cpu")) if world()[1] > 1
                else lambda xb, yb, m=method, n=net: m.training_loss(n, xb, yb, 0))
        loss(x, y).backward()
        out[name] = method.run_batch_size() if name == "ewc" else method._offset
    return out


def _methods_and_eval(root: str) -> dict:
    out: dict[str, Any] = {}
    for name in METHODS:
        cfg = TrainConfig.from_preset("pdigits", method=name, n_tasks=2, epochs=1)
        try:
            tr = _Keep(cfg, Path(root) / name, quiet=True, plots=False)
        except ValueError as e:  # the method's DISTRIBUTED reason
            out[name] = {"refused": str(e)}
            continue
        try:
            acc = tr.run()["acc_matrix"]
        except ValueError as e:  # StateMismatchError: the replicas diverged
            out[name] = {"error": str(e)}
            continue
        out[name] = {"acc": acc, "sums": _state_sums(*tr.kept)}
    out["grads"] = _sharded_grads()
    out["rows_counted"] = _rows_counted()
    try:
        _DivergeRank1(_cfg(n_tasks=1, epochs=1), Path(root) / "diverge", quiet=True,
                      plots=False).run()
        out["diverged"] = "not caught"
    except StateMismatchError as e:
        out["diverged"] = str(e)
    own = Path(root) / f"own-rank{world()[0]}"
    train(_cfg(), own, quiet=True, plots=False)
    out["own_dir"] = sorted(p.name for p in own.iterdir()) if own.exists() else None
    # sharded evaluation against the same network scored whole in the parent
    torch.manual_seed(0)
    stream = load_benchmark("pdigits", seed=0)
    tr = Trainer(_cfg(), Path(root) / "eval", quiet=True, plots=False)
    net, _ = tr._setup(stream)
    counted = _CountRows(net)
    loss, acc = tr.evaluate(counted, stream[0], 0)
    out["eval"] = {"loss": loss, "acc": acc, "rows": counted.rows,
                   "state": {k: v.clone() for k, v in net.state_dict().items()}}
    return out


@pytest.fixture(scope="module")
def per_method(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    root = tmp_path_factory.mktemp("methods")
    return run_ranks(_methods_and_eval, root, str(root / "runs"))


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_runs_identically_or_is_refused(per_method: list[dict], name: str) -> None:
    r0, r1 = per_method[0][name], per_method[1][name]
    assert "error" not in r0 and "error" not in r1, (r0.get("error"), r1.get("error"))
    reason = getattr(method_class(name), "DISTRIBUTED", None)
    if reason is not None:
        assert r0 == r1 and name in r0["refused"] and reason in r0["refused"]
        return
    assert "refused" not in r0, r0
    assert r0["acc"] == r1["acc"]
    assert r0["sums"] == r1["sums"]  # every tensor of model and method, bitwise


def test_a_diverged_rank_stops_the_run_naming_the_tensor(per_method: list[dict]) -> None:
    for r in per_method:  # every rank raises, with the same message
        assert r["diverged"] == per_method[0]["diverged"]
        assert "end of task 0: model: 'heads.0.weight' differs across ranks: ranks [1]" \
            in r["diverged"], r["diverged"]


def test_sharded_gradient_is_the_global_batch_gradient(per_method: list[dict]) -> None:
    for r in per_method:
        for n in (5, 1):
            # the same parameters get gradients (the unused head's stay None) ...
            assert r["grads"][n]["names"], n
            # ... equal to rounding: two partial sums instead of one
            assert r["grads"][n]["diff"] < 1e-6, (n, r["grads"][n])


def test_a_stand_in_row_counts_no_sample(per_method: list[dict]) -> None:
    # batch 1 on 2 ranks: EWC's Fisher batch and HAT's sample count as on one process
    assert [r["rows_counted"] for r in per_method] == [_rows_counted()] * 2


def test_evaluation_is_sharded_and_equals_one_process(per_method: list[dict]) -> None:
    stream = load_benchmark("pdigits", seed=0)
    n = len(stream[0].y_test)
    e0, e1 = per_method[0]["eval"], per_method[1]["eval"]
    assert (e0["rows"], e1["rows"]) == ((n + 1) // 2, n // 2)  # each rank its rows only
    assert (e0["loss"], e0["acc"]) == (e1["loss"], e1["acc"])  # all-reduced: the same
    tr = Trainer(_cfg(), "unused", quiet=True, plots=False)
    net, _ = tr._setup(stream)
    net.load_state_dict(e0["state"])
    loss, acc = tr.evaluate(net, stream[0], 0)
    assert acc == e0["acc"]  # counts are exact
    assert loss == pytest.approx(e0["loss"], rel=1e-6)  # float32 partial sums per shard


# -- refusals and the launcher's arguments (no processes) ------------------------------------


TWO = ddp.Group(0, 2, "gloo", torch.device("cpu"))


def test_refusals_name_the_reason() -> None:
    with pytest.raises(ValueError, match="compile='inductor' is not supported on 2 ranks"):
        ddp.check_supported(TWO, method_class("blip"), "inductor")
    from blip.models import ResNet18

    with pytest.raises(ValueError, match="BatchNorm"):
        ddp.check_model(TWO, ResNet18((3, 32, 32), [2]))
    ddp.check_model(ddp.Group(0, 1, None, torch.device("cpu")), ResNet18((3, 32, 32), [2]))


def test_threads_per_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: {0, 1}, raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert ddp.cpu_threads(None, 2) == 1
    assert ddp.cpu_threads(3, 2) == 3
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert ddp.cpu_threads(None, 1) == 2


def _blip(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "blip", *argv], capture_output=True, text=True,
                          cwd=REPO, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})


def test_nproc_is_checked_and_stripped(tmp_path: Path) -> None:
    r = _blip("train", "--nproc", "0")
    assert r.returncode == 2 and "nproc" in r.stderr, r.stderr
    # a bad setting is named before any worker starts
    r = _blip("train", "--nproc", "2", "--lr", "-1", "--out", str(tmp_path / "bad"))
    assert r.returncode == 2 and "lr" in r.stderr and "torch.distributed" not in r.stderr
    # a worker's own error: each rank names it, the launcher names the failed ranks
    r = _blip("train", "--nproc", "2", "--model", "alexnet", "--out", str(tmp_path / "x"))
    assert r.returncode == 1 and "needs image inputs" in r.stderr, r.stderr
    # the rank that failed first exits 2; the agent may stop the other one (signal 15)
    lines = [x for x in r.stderr.splitlines() if x.endswith("of 2 failed (see its error above)")]
    assert len(lines) == 1, r.stderr
    line = lines[0]
    assert re.fullmatch(r"blip train: error: rank \d \((exit code 2|killed by signal 15)\)"
                        r"(, rank \d \((exit code 2|killed by signal 15)\))? of 2 failed.*",
                        line) and "(exit code 2)" in line, line
    assert ddp.strip_option(["train", "--nproc", "2", "--epochs", "1", "--nproc=3"],
                            "--nproc") == ["train", "--epochs", "1"]


def test_rl_refuses_several_torchrun_workers(monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    from blip.cli import main

    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "localhost",
           "MASTER_PORT": "29500"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert ddp.env_rank() == 1
    assert main(["rl", "--smoke", "--out", "unused"]) == 2
    assert "`blip rl` is single-process" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "1")
    ddp.single_process_only("rl")  # one worker: allowed
