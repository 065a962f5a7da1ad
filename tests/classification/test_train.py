"""End-to-end: the trainer on pdigits, run outputs, report, resume after a real kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from blip.classification.trainer import TrainConfig, Trainer
from blip.cli import main as cli_main
from blip.runs import checkpoint as ckpt
from blip.runs import metrics

pytest.importorskip("sklearn")
ROOT = Path(__file__).resolve().parents[2]
SHORT = {"n_tasks": 5, "epochs": 10, "batch_size": 64}  # ~10 s per run on 2 CPU cores


def test_metrics_definitions() -> None:
    m = metrics.new_matrix(3)
    m[0, 0] = 0.9
    m[1, :2] = [0.8, 0.95]
    m[2, :] = [0.7, 0.85, 0.9]
    assert metrics.acc(m) == pytest.approx((0.7 + 0.85 + 0.9) / 3)
    assert metrics.bwt(m) == pytest.approx(((0.7 - 0.9) + (0.85 - 0.95)) / 2)
    assert metrics.bwt(m, authors=True) == pytest.approx(((0.7 - 0.9) + (0.85 - 0.95)) / 3)
    assert metrics.forgetting(m) == pytest.approx([0.2, 0.1])
    assert metrics.bwt(m, upto=1) == pytest.approx(-0.1)
    assert np.array_equal(metrics.matrix_from_list(metrics.matrix_to_list(m)), m,
                          equal_nan=True)
    cap = metrics.used_capacity({"a": (20, 2), "b": (0, 2)}, max_bit=20)
    assert cap == {"a": 0.5, "b": 0.0, "overall": 0.25}


def test_atomic_save_leaves_no_temp(tmp_path: Path) -> None:
    p = tmp_path / "c.pt"
    ckpt.save_atomic({"a": torch.arange(3)}, p)
    ckpt.save_atomic({"a": torch.arange(4)}, p)
    assert [f.name for f in tmp_path.iterdir()] == ["c.pt"]
    assert torch.equal(ckpt.load(p)["a"], torch.arange(4))


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = {}
    for method in ("blip", "finetune"):
        d = tmp_path_factory.mktemp(method)
        cfg = TrainConfig.from_preset("pdigits", method=method, **SHORT)
        Trainer(cfg, d, quiet=True).run()
        out[method] = d
    return out


def test_blip_preserves_where_finetune_forgets(runs: dict[str, Path]) -> None:
    r = {m: json.loads((d / "results.json").read_text()) for m, d in runs.items()}
    assert r["blip"]["bwt"] >= -0.005, r["blip"]["acc_matrix"]
    assert r["finetune"]["bwt"] <= -0.01, r["finetune"]["acc_matrix"]
    assert r["blip"]["acc"] > 0.8 and r["finetune"]["acc"] > 0.8
    T = SHORT["n_tasks"]
    assert r["blip"]["bwt_authors"] == pytest.approx(r["blip"]["bwt"] * (T - 1) / T)


def test_run_outputs(runs: dict[str, Path]) -> None:
    d = runs["blip"]
    for f in ("results.json", "acc_matrix.csv", "acc_matrix.json", "checkpoint.pt",
              "acc_matrix.png", "bits_hist.png", "capacity.png"):
        assert (d / f).is_file(), f
    r = json.loads((d / "results.json").read_text())
    T = SHORT["n_tasks"]
    m = metrics.matrix_from_list(r["acc_matrix"])
    assert m.shape == (T, T) and np.isnan(m[0, 1]) and not np.isnan(np.tril(m)).any()
    caps = [c["overall"] for c in r["capacity"]]
    assert len(caps) == T and all(0 < a <= b <= 1 for a, b in zip(caps[:-1], caps[1:], strict=True))
    assert len(r["task_seconds"]) == T and len(r["forgetting"]) == T - 1
    assert r["complete"] and r["config"]["epochs"] == SHORT["epochs"]
    rows = (d / "acc_matrix.csv").read_text().splitlines()
    assert rows[0].startswith("after_task,task0") and len(rows) == T + 1
    assert not (runs["finetune"] / "bits_hist.png").exists()  # nothing quantized


def test_validation_matrix_is_recorded_beside_the_test_one(runs: dict[str, Path]) -> None:
    """Settings are chosen on the validation splits: results.json holds their accuracy
    matrix, ACC and BWT, and each task's validation accuracy before its end of task."""
    from blip.classification.data import load_benchmark

    r = json.loads((runs["blip"] / "results.json").read_text())
    T = SHORT["n_tasks"]
    v = metrics.matrix_from_list(r["valid_acc_matrix"])
    assert v.shape == (T, T) and np.isnan(v[0, 1]) and not np.isnan(np.tril(v)).any()
    assert r["valid_acc"] == pytest.approx(metrics.acc(v))
    assert r["valid_bwt"] == pytest.approx(metrics.bwt(v))
    # fractions of each task's validation split, not its test split
    stream = load_benchmark("pdigits")
    n_valid = [len(stream[t].y_valid) for t in range(T)]
    for t in range(T):
        for u in range(t + 1):
            assert (v[t, u] * n_valid[u]) == pytest.approx(round(v[t, u] * n_valid[u]))
        before = r["tasks"][t]["valid_acc_before_end_task"]
        assert 0.0 < before <= 1.0
        assert before * n_valid[t] == pytest.approx(round(before * n_valid[t]))
    assert not np.array_equal(np.tril(v), np.tril(metrics.matrix_from_list(r["acc_matrix"])))


def test_report_cli(runs: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["report", str(runs["blip"])]) == 0
    out = capsys.readouterr().out
    assert "ACC" in out and "authors'" in out and "used capacity" in out
    assert cli_main(["report", str(runs["blip"]), str(runs["finetune"])]) == 0
    table = capsys.readouterr().out
    assert "blip" in table and "finetune" in table and "BWT/T" in table
    assert cli_main(["report", str(runs["blip"].parent / "nowhere")]) == 2
    assert "results.json" in capsys.readouterr().err


def test_resume_rejects_changed_settings(runs: dict[str, Path]) -> None:
    cfg = TrainConfig.from_preset("pdigits", method="blip", **{**SHORT, "lr": 0.05})
    with pytest.raises(ValueError, match=r"settings differ \(lr: checkpoint 0.1 vs now 0.05"):
        Trainer(cfg, runs["blip"], quiet=True).run(resume=True)


def test_configs_of_the_flat_layout_still_match() -> None:
    """Checkpoints and results written before F_prior/max_bit became method hyper-parameters
    held them at the top level of the config; they still resume (and compare reuses them)."""
    for method in ("blip", "ewc"):
        now = TrainConfig.from_preset("pdigits", method=method, **SHORT).to_dict()
        old = {**now, "F_prior": 1e-15, "max_bit": 20, "method_kwargs": {}}
        assert TrainConfig.upgrade(old) == now
    assert TrainConfig.from_preset("pdigits", method="blip").method_kwargs == {"F_prior": 1e-15}
    assert TrainConfig.from_preset("pdigits", method="ewc").method_kwargs == {}
    # a setting that differed then still differs now
    old = {**TrainConfig.from_preset("pdigits").to_dict(), "F_prior": 1e-14, "max_bit": 16,
           "method_kwargs": {}}
    assert TrainConfig.upgrade(old)["method_kwargs"] == {"F_prior": 1e-14, "max_bit": 16}


def test_cli_blip_flags_are_hyper_parameters(tmp_path: Path) -> None:
    """--F-prior / --max-bit / --forward-mode are sugar for --hp; a method that does not take
    one says so instead of ignoring it."""
    args = ["train", "--n-tasks", "1", "--epochs", "1", "--quiet", "--no-plots"]
    assert cli_main([*args, "--out", str(tmp_path / "b"), "--F-prior", "1e-14", "--max-bit",
                     "12"]) == 0
    cfg = json.loads((tmp_path / "b" / "results.json").read_text())["config"]
    assert cfg["method_kwargs"] == {"F_prior": 1e-14, "max_bit": 12}
    assert cli_main([*args, "--out", str(tmp_path / "e"), "--method", "ewc", "--max-bit",
                     "12"]) == 2


def _train_cmd(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "blip", "train", "--benchmark", "pdigits", "--n-tasks", "4",
            "--epochs", "4", "--quiet", "--no-plots", "--out", str(out), *extra]


def test_resume_after_kill_gives_same_matrix(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    full, killed = tmp_path / "full", tmp_path / "killed"
    subprocess.run(_train_cmd(full), cwd=ROOT, env=env, check=True, timeout=120)

    proc = subprocess.Popen(_train_cmd(killed), cwd=ROOT, env=env)
    try:
        deadline = time.monotonic() + 90
        # results.json is written after the checkpoint it describes: once it exists, so
        # does a checkpoint at least as far along
        while not (killed / "results.json").exists():
            assert proc.poll() is None, "run ended before writing a checkpoint"
            assert time.monotonic() < deadline, "no checkpoint within 90 s"
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    partial = json.loads((killed / "results.json").read_text())
    assert not partial["complete"], "the run finished before the kill: nothing was resumed"

    subprocess.run(_train_cmd(killed, "--resume"), cwd=ROOT, env=env, check=True, timeout=120)
    a = json.loads((full / "results.json").read_text())
    b = json.loads((killed / "results.json").read_text())
    assert b["complete"] and b["acc_matrix"] == a["acc_matrix"]
    assert b["capacity"] == a["capacity"]
    sa, sb = ckpt.load(full / "checkpoint.pt"), ckpt.load(killed / "checkpoint.pt")
    for k, v in sa["model"].items():
        assert torch.equal(v, sb["model"][k]), k
