"""A run records its method's resolved hyper-parameters (defaults included): a resume or a
reuse by ``blip compare`` never carries a run on under other defaults (issue 14 changed the
defaults of nine methods)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from blip.classification.compare import compare
from blip.classification.trainer import CHECKPOINT, RESULTS, TrainConfig, train
from blip.runs import checkpoint as ckpt

pytest.importorskip("sklearn")
SMALL = {"n_tasks": 2, "epochs": 1}


@pytest.fixture(autouse=True)
def _no_user_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # compare also searches ./runs


def _drop_record(run: Path) -> None:
    """Make ``run`` look written before the record existed (results and checkpoint)."""
    res = json.loads((run / RESULTS).read_text())
    del res["method_hparams"]
    (run / RESULTS).write_text(json.dumps(res))
    state = ckpt.load(run / CHECKPOINT)
    del state["method_hparams"]
    ckpt.save_atomic(state, run / CHECKPOINT)


def test_results_and_checkpoint_record_the_resolved_hparams(tmp_path: Path) -> None:
    cfg = TrainConfig.from_preset("pdigits", method="lwf", **SMALL)
    train(cfg, tmp_path / "r", quiet=True, plots=False)
    rec = json.loads((tmp_path / "r" / RESULTS).read_text())["method_hparams"]
    assert rec["revision"] == 2
    assert rec["values"]["lamb"] == 2.0 and rec["values"]["T"] == 1.0  # the defaults too
    assert ckpt.load(tmp_path / "r" / CHECKPOINT)["method_hparams"] == rec


def test_resume_refuses_a_run_of_other_defaults(tmp_path: Path) -> None:
    cfg = TrainConfig.from_preset("pdigits", method="ewc", **SMALL)
    run = tmp_path / "ewc"
    train(cfg, run, quiet=True, plots=False)
    state = ckpt.load(run / CHECKPOINT)
    state["method_hparams"]["values"]["lamb"] = 1.0  # as if the default had been 1
    ckpt.save_atomic(state, run / CHECKPOINT)
    with pytest.raises(ValueError, match=r"ran with other hyper-parameters \(lamb: 1.0 vs now"):
        train(cfg, run, resume=True, quiet=True, plots=False)
    _drop_record(run)
    with pytest.raises(ValueError, match="defaults have changed since"):
        train(cfg, run, resume=True, quiet=True, plots=False)


def test_an_unrecorded_run_resumes_while_its_methods_defaults_are_unchanged(
        tmp_path: Path) -> None:
    cfg = TrainConfig.from_preset("pdigits", method="finetune", **SMALL)
    run = tmp_path / "ft"
    first = train(cfg, run, quiet=True, plots=False)
    _drop_record(run)
    again = train(cfg, run, resume=True, quiet=True, plots=False)
    assert again["acc_matrix"] == first["acc_matrix"]


def test_compare_reuses_an_unrecorded_run_only_for_unchanged_defaults(tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    compare("pdigits", ["finetune", "hat"], [0], out, log=lambda _: None, plots=False, **SMALL)
    for m in ("finetune", "hat"):
        _drop_record(out / f"pdigits-{m}-seed0")
    logs: list[str] = []
    compare("pdigits", ["finetune", "hat"], [0], out, log=logs.append, plots=False, **SMALL)
    assert any("finetune seed 0: reusing" in line for line in logs), logs
    assert any("hat seed 0: running" in line for line in logs), logs


def test_a_record_lacking_a_later_hyper_parameter_reads_it_at_its_default(
        tmp_path: Path) -> None:
    """blip's allocation options were added at the defaults that reproduce what ran before
    them: a run recorded without them is reused by compare; one recorded with another
    value is not."""
    out = tmp_path / "cmp"
    compare("pdigits", ["blip"], [0], out, log=lambda _: None, plots=False, **SMALL)
    run = out / "pdigits-blip-seed0"
    res = json.loads((run / RESULTS).read_text())
    for key in ("gain_scale", "rounding", "max_bits_per_task", "prior_bits"):
        del res["method_hparams"]["values"][key]
    (run / RESULTS).write_text(json.dumps(res))
    logs: list[str] = []
    compare("pdigits", ["blip"], [0], out, log=logs.append, plots=False, **SMALL)
    assert any("blip seed 0: reusing" in line for line in logs), logs
    res["method_hparams"]["values"]["gain_scale"] = 0.5
    (run / RESULTS).write_text(json.dumps(res))
    logs.clear()
    compare("pdigits", ["blip"], [0], out, log=logs.append, plots=False, **SMALL)
    assert any("blip seed 0: running" in line for line in logs), logs
