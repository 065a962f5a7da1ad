"""`blip reproduce`: the authors' command line, verbatim, and our run with their settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from blip.classification.reproduce import RUNS, authors_command
from blip.cli import main

# The authors' commands as their README prints them (github.com/Yujun-Shi/BLIP, 975e6dbc).
README_COMMANDS = {
    "mnist5": "python run_blip.py --approach blip --experiment mnist5 --lr 0.01 --sbatch 64 "
              "--F-prior 1e-15 --nepochs 200",
    "pmnist": "python run_blip.py --approach blip --experiment pmnist --lr 0.01 --sbatch 64 "
              "--F-prior 1e-15 --nepochs 200",
    "cifar-alt": "python run_blip.py --experiment cifar --lr 0.05 --sbatch 32 --F-prior 5e-16 "
                 "--mul 2",
    "mixture5": "python run_blip.py --experiment mixture5 --lr 0.05 --sbatch 32 --F-prior 5e-17 "
                "--mul 0.8 --seed 0",
    "miniimagenet": "python run_blip.py --F-prior 5e-16 --lr 0.01 --momentum 0.0 --mul 1 "
                    "--sbatch 32 --seed 0 --ntasks 20 --arch alexnet",
    "miniimagenet-resnet": "python run_blip.py --F-prior 1e-16 --lr 0.01 --momentum 0.0 "
                           "--mul 1.5 --sbatch 32 --seed 0 --ntasks 20 --arch resnet",
}
# what our run must use for each (the preset values pinned in test_presets.py)
OURS = {
    "mnist5": ("benchmark='mnist5'", "lr=0.01", "batch_size=64", "epochs=200", "hidden=1200",
               "n_hidden_layers=1", "'F_prior': 1e-15"),
    "pmnist": ("benchmark='pmnist'", "lr=0.01", "batch_size=64", "epochs=200", "hidden=1200",
               "n_hidden_layers=1", "'F_prior': 1e-15"),
    "cifar-alt": ("model='alexnet'", "lr=0.05", "batch_size=32", "width=2.0",
                  "'F_prior': 5e-16"),
    "mixture5": ("model='alexnet'", "lr=0.05", "batch_size=32", "width=0.8", "'F_prior': 5e-17"),
    "miniimagenet": ("model='alexnet'", "lr=0.01", "batch_size=32", "width=1.0", "momentum=0.0",
                     "'F_prior': 5e-16", "'fisher_batches': 100", "'fisher_batch_size': 10"),
    "miniimagenet-resnet": ("model='resnet18'", "lr=0.01", "width=1.5", "'F_prior': 1e-16",
                            "'fisher_batches': 100"),
}


def test_every_full_benchmark_has_an_authors_run() -> None:
    assert set(RUNS) == set(README_COMMANDS)
    assert {r.benchmark for r in RUNS.values()} == \
        {"mnist5", "pmnist", "cifar-alt", "mixture5", "miniimagenet"}


@pytest.mark.parametrize("name", sorted(README_COMMANDS))
def test_dry_run_needs_no_data(name: str, tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "no-data-here"
    empty.mkdir()
    out = tmp_path / "run"
    rc = main(["reproduce", name, "--dry-run", "--data-dir", str(empty), "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 0
    assert README_COMMANDS[name] in text  # verbatim
    for setting in OURS[name] + ("stop_on_nonfinite=True",):
        assert setting in text, (name, setting)
    assert "differs from the authors' run: nothing set here" in text
    assert not out.exists() and not any(empty.iterdir())  # nothing run, nothing read


def test_seed_goes_into_their_command() -> None:
    assert authors_command(RUNS["mixture5"], 3).endswith("--mul 0.8 --seed 3")
    assert authors_command(RUNS["pmnist"], 2).endswith("--nepochs 200 --seed 2")
    assert authors_command(RUNS["pmnist"], 0) == README_COMMANDS["pmnist"]


def test_embedded_run_uses_the_authors_settings(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    rc = main(["reproduce", "pmnist", "--embedded", "--epochs", "1", "--n-tasks", "2",
               "--threads", "1", "--out", str(out), "--quiet", "--no-plots"])
    text = capsys.readouterr().out
    assert rc == 0
    assert README_COMMANDS["pmnist"] in text
    assert "the embedded 'mnist5k-perm' stream" in text
    assert "epochs=1 (theirs 200)" in text and "n_tasks=2 (theirs None)" in text
    res = json.loads((out / "results.json").read_text())
    cfg = res["config"]
    assert res["benchmark"] == "mnist5k-perm" and res["tasks_done"] == 2
    assert (cfg["lr"], cfg["batch_size"], cfg["hidden"], cfg["n_hidden_layers"]) == \
        (0.01, 64, 1200, 1)
    assert cfg["method_kwargs"]["F_prior"] == 1e-15 and cfg["stop_on_nonfinite"] is True
    assert res["fisher_budget"] == 8000 and len(res["fisher_samples"]) == 2


def test_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # no stand-in for cifar-alt; a full run without its files names what is missing
    assert main(["reproduce", "cifar-alt", "--embedded", "--dry-run"]) == 2
    assert "no embedded stand-in" in capsys.readouterr().err
    assert main(["reproduce", "mnist5", "--data-dir", str(tmp_path), "--out",
                 str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("blip reproduce: error:") and "MNIST" in err
    with pytest.raises(SystemExit):
        main(["reproduce", "no-such-benchmark", "--dry-run"])
    assert main(["reproduce", "pmnist", "--dry-run", "--epochs", "0"]) == 2
    assert "epochs" in capsys.readouterr().err
