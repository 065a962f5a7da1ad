"""`blip compare` on a CI-sized pdigits setting: table, CSV, plot, reuse of runs."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from blip.classification.compare import compare
from blip.classification.report import load_results
from blip.cli import main

pytest.importorskip("sklearn")
SMALL = {"n_tasks": 2, "epochs": 2}


@pytest.fixture(autouse=True)
def _no_user_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # compare searches ./runs for finished runs: keep the repository's out of the tests
    monkeypatch.chdir(tmp_path)


def test_compare_writes_one_table_and_reuses_runs(tmp_path: Path) -> None:
    logs: list[str] = []
    out = tmp_path / "cmp"
    md = compare("pdigits", ["blip", "finetune"], [0, 1], out, log=logs.append, **SMALL)
    starts = [line for line in logs if ": running " in line]
    assert [s.split(":")[0] for s in starts] == [
        "[1/4] blip seed 0", "[2/4] blip seed 1", "[3/4] finetune seed 0", "[4/4] finetune seed 1"]
    # a progress line per task: run, method, seed, task k/T and an ETA
    ticks = [line for line in logs if ", ETA " in line]
    assert len(ticks) == 8 and ticks[0].startswith("[1/4] blip seed 0: task 1/2, ETA ")
    assert ticks[-1] == "[4/4] finetune seed 1: task 2/2, ETA 0s"
    assert "| blip | 2 |" in md and "| finetune | 2 |" in md and " ± " in md
    with open(out / "compare.csv") as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"blip", "finetune"}
    for r in rows.values():  # numbers only: mean and std in their own columns
        assert 0 <= float(r["acc_mean"]) <= 100 and float(r["acc_std"]) >= 0
        assert int(r["seeds"]) == 2 and "±" not in ",".join(r.values())
    # BLIP keeps prev (4 B), bits (1 B) and F_old (4 B) per trunk weight; finetune nothing.
    assert float(rows["blip"]["extra_bytes_per_param"]) > 0
    assert float(rows["finetune"]["extra_bytes_per_param"]) == 0
    # used capacity (percent of the bits) for BLIP, empty for a method without bits
    assert 0 < float(rows["blip"]["capacity_mean"]) <= 100
    assert rows["finetune"]["capacity_mean"] == "" and "| – |" in md.split("| finetune |")[1]
    assert (out / "compare_accuracy.png").stat().st_size > 0

    logs.clear()
    again = compare("pdigits", ["blip", "finetune"], [0, 1], out, log=logs.append,
                    plots=False, **SMALL)
    assert again == md
    assert all(": reusing " in line for line in logs) and len(logs) == 4


def test_one_seed_shows_no_spread(tmp_path: Path) -> None:
    md = compare("pdigits", ["finetune"], [0], tmp_path / "c", log=lambda _: None,
                 plots=False, **SMALL)
    assert "±" not in md
    with open(tmp_path / "c" / "compare.csv") as f:
        (row,) = csv.DictReader(f)
    assert float(row["acc_mean"]) > 0 and row["acc_std"] == ""


def test_compare_reuses_the_users_train_runs(tmp_path: Path) -> None:
    # `blip train` writes to runs/<benchmark>-<method>-seed<k> by default: compare finds it
    args = ["train", "--method", "finetune", "--n-tasks", "2", "--epochs", "2", "--no-plots",
            "--quiet"]
    assert main(args) == 0
    assert (tmp_path / "runs" / "pdigits-finetune-seed0" / "results.json").is_file()
    mine = tmp_path / "elsewhere" / "my-run"
    assert main([*args, "--seed", "1", "--out", str(mine)]) == 0
    logs: list[str] = []
    compare("pdigits", ["finetune"], [0, 1, 2], tmp_path / "c", log=logs.append, plots=False,
            reuse=[tmp_path / "elsewhere"], **SMALL)
    assert logs[0] == f"[1/3] finetune seed 0: reusing {Path('runs/pdigits-finetune-seed0')}"
    assert logs[1] == f"[2/3] finetune seed 1: reusing {mine}"
    assert "[3/3] finetune seed 2: running" in logs[2]
    assert not (tmp_path / "c" / "pdigits-finetune-seed0").exists()
    # other settings are not reused
    logs.clear()
    compare("pdigits", ["finetune"], [1], tmp_path / "d", log=logs.append, plots=False,
            reuse=[mine], n_tasks=2, epochs=1)
    assert ": running " in logs[0]
    with pytest.raises(ValueError, match="reuse: no such directory"):
        compare("pdigits", ["finetune"], [1], tmp_path / "e", reuse=[tmp_path / "nope"], **SMALL)


def test_compare_without_matplotlib_warns_and_writes_tables(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import blip.classification.compare as cmp

    def no_mpl() -> None:
        raise ImportError("No module named 'matplotlib'")

    monkeypatch.setattr(cmp, "pyplot", no_mpl)
    logs: list[str] = []
    compare("pdigits", ["finetune"], [0], tmp_path / "c", log=logs.append, **SMALL)
    assert any(line.startswith("warning: plots skipped") and "matplotlib" in line
               for line in logs)
    assert (tmp_path / "c" / "compare.csv").is_file()
    assert not (tmp_path / "c" / "compare_accuracy.png").exists()


def test_compare_rejects_unknown_methods_before_running(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    code = main(["compare", "--methods", "blip,nosuch", "--seeds", "0", "--out", str(tmp_path)])
    assert code != 0
    assert "unknown methods ['nosuch']" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_hp_flags_reach_the_methods(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    from blip.cli import compare_hp, parse_hp

    assert parse_hp(["lamb=100", "penalty_step=gradient", "exclude=('heads',)"]) == {
        "lamb": 100, "penalty_step": "gradient", "exclude": ("heads",)}
    with pytest.raises(ValueError, match="NAME=VALUE"):
        parse_hp(["lamb"])
    per = compare_hp(["lamb=7", "si:c=0.5"], ["ewc", "mas", "si", "blip"])
    assert per == {"ewc": {"lamb": 7}, "mas": {"lamb": 7}, "si": {"c": 0.5}, "blip": {}}
    with pytest.raises(ValueError, match="accepts 'gamma'"):
        compare_hp(["gamma=0.5"], ["ewc", "blip"])
    with pytest.raises(ValueError, match="not in --methods"):
        compare_hp(["si:c=1"], ["ewc"])
    # blip train --hp: the run records it, and a name the method lacks is a clear error
    out = tmp_path / "run"
    assert main(["train", "--method", "ewc", "--hp", "lamb=3", "--n-tasks", "2", "--epochs", "1",
                 "--out", str(out), "--no-plots", "--quiet"]) == 0
    assert load_results(out)["config"]["method_kwargs"] == {"lamb": 3}
    code = main(["train", "--method", "ewc", "--hp", "c=1", "--n-tasks", "2", "--epochs", "1",
                 "--out", str(tmp_path / "bad"), "--no-plots", "--quiet"])
    assert code == 2 and "unknown hyper-parameters ['c']" in capsys.readouterr().err
    assert main(["methods"]) == 0
    listing = capsys.readouterr().out
    assert "penalty_step = 'proximal'" in listing and "packnet:" in listing


def test_overall_bar_counts_every_run_and_closes_once(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import blip.classification.compare as cmp

    events: list[str] = []

    class Bar:
        def __init__(self, total: int, desc: str, enabled: bool, **_: object) -> None:
            events.append(f"open {desc} {total} {enabled}")

        def update(self, **_: object) -> None:
            events.append("update")

        def close(self) -> None:
            events.append("close")

    monkeypatch.setattr(cmp, "Progress", Bar)
    compare("pdigits", ["finetune"], [0, 1], tmp_path / "c", log=lambda _: None, plots=False,
            progress=True, **SMALL)
    # the trainer closes its hooks after each run: the overall bar must outlive them
    assert events == ["open compare 2 True", "update", "update", "close"]
