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


def test_compare_writes_one_table_and_reuses_runs(tmp_path: Path) -> None:
    logs: list[str] = []
    md = compare("pdigits", ["blip", "finetune"], [0, 1], tmp_path, log=logs.append, **SMALL)
    assert sum(line.startswith("running") for line in logs) == 4
    assert "| blip | 2 |" in md and "| finetune | 2 |" in md
    with open(tmp_path / "compare.csv") as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"blip", "finetune"}
    # BLIP keeps prev (4 B), bits (1 B) and F_old (4 B) per trunk weight; finetune nothing.
    assert float(rows["blip"]["extra bytes/param"]) > 0
    assert float(rows["finetune"]["extra bytes/param"]) == 0
    assert (tmp_path / "compare_accuracy.png").stat().st_size > 0

    logs.clear()
    again = compare("pdigits", ["blip", "finetune"], [0, 1], tmp_path, log=logs.append,
                    plots=False, **SMALL)
    assert again == md
    assert all(line.startswith("reusing") for line in logs) and len(logs) == 4


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
