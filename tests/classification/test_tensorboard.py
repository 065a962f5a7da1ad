"""`--tensorboard`: the event files hold the tags and values of the run (read back with
tensorboard's EventAccumulator); without the package, a clear error before training."""

from __future__ import annotations

import builtins
import json
from pathlib import Path

import pytest

from blip.cli import main

pytest.importorskip("sklearn")


def _events(run: Path):  # noqa: ANN202 - an EventAccumulator, loaded
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0,
                                                                    "histograms": 0})
    acc.Reload()
    return acc


def test_train_writes_epochs_accuracy_rows_capacity_and_bits(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    assert main(["train", "--n-tasks", "2", "--epochs", "2", "--out", str(out), "--no-plots",
                 "--quiet", "--tensorboard"]) == 0
    res = json.loads((out / "results.json").read_text())
    ev = _events(out)
    tags = ev.Tags()
    epochs = sum(t["epochs_run"] for t in res["tasks"])
    for tag in ("epoch/valid_loss", "epoch/valid_acc", "epoch/lr"):
        assert [e.step for e in ev.Scalars(tag)] == list(range(epochs))
    assert ev.Scalars("epoch/lr")[0].value == pytest.approx(res["config"]["lr"])
    # the accuracy-matrix rows: acc/task j at step i is acc_matrix[i][j]
    for i, row in enumerate(res["acc_matrix"]):
        for j, v in enumerate(row[: i + 1]):
            (e,) = [e for e in ev.Scalars(f"acc/task{j}") if e.step == i]
            assert e.value == pytest.approx(v)
    cap = res["capacity"][-1]
    assert cap and ev.Scalars("capacity/overall")[-1].value == pytest.approx(cap["overall"])
    bits = [t for t in tags["histograms"] if t.startswith("bits/")]
    layer = next(iter(res["bits_hist"][-1]))
    assert f"bits/{layer}" in bits
    h = ev.Histograms(f"bits/{layer}")[-1]
    assert h.step == 1
    assert h.histogram_value.num == sum(res["bits_hist"][-1][layer])
    assert list(h.histogram_value.bucket) == res["bits_hist"][-1][layer]


def test_rl_writes_updates_and_the_reward_matrix(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    pytest.importorskip("minatar")
    out = tmp_path / "rl"
    assert main(["rl", "--suite", "minatar5", "--method", "blip", "--games", "2",
                 "--steps", "256", "--envs", "2", "--n-steps", "64", "--eval-episodes", "1",
                 "--eval-max-steps", "20", "--gif-frames", "0", "--no-plots", "--quiet",
                 "--out", str(out), "--tensorboard"]) == 0
    res = json.loads((out / "results.json").read_text())
    ev = _events(out)
    assert [e.step for e in ev.Scalars("update/loss")] == [0, 1, 2, 3]  # 2 updates x 2 games
    for i, row in enumerate(res["reward_matrix"]):
        for j, v in enumerate(row[: i + 1]):
            (e,) = [e for e in ev.Scalars(f"reward/game{j}") if e.step == i]
            assert e.value == pytest.approx(v)
    cap = res["per_game"][1]["method"]["capacity"]
    assert ev.Scalars("capacity/overall")[-1].value == pytest.approx(cap["overall"])
    layer = next(iter(cap["layers"]))
    h = ev.Histograms(f"bits/{layer}")[-1]
    assert h.step == 1 and h.histogram_value.num > 0 and sum(h.histogram_value.bucket[1:]) > 0


def test_missing_tensorboard_is_one_clear_error_before_training(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    real = builtins.__import__

    def no_tb(name: str, *args, **kw):  # noqa: ANN002, ANN003, ANN202
        if name.startswith(("torch.utils.tensorboard", "tensorboard")):
            raise ImportError(f"No module named {name!r}")
        return real(name, *args, **kw)

    monkeypatch.setattr(builtins, "__import__", no_tb)
    for cmd in (["train", "--n-tasks", "2", "--epochs", "1"],
                ["compare", "--methods", "finetune", "--seeds", "0", "--epochs", "1"],
                ["rl", "--suite", "minatar5", "--steps", "256", "--envs", "2",
                 "--n-steps", "64"]):
        out = tmp_path / cmd[0]
        assert main([*cmd, "--out", str(out), "--tensorboard"]) == 2
        err = capsys.readouterr().err
        assert "pip install tensorboard" in err and "Traceback" not in err
        assert not out.exists()  # nothing trained, nothing written
