"""Named method variants (``blip:<variant>``): resolved by method_class, trained, recorded
and compared like any method, with the variant's settings as its defaults."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from blip.cli import compare_hp
from blip.cli import main as cli_main
from blip.methods import BLIPMethod, base, method_class, method_names

pytest.importorskip("sklearn")
SMALL = ["--n-tasks", "2", "--epochs", "1"]


@pytest.fixture
def half(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setattr(BLIPMethod, "VARIANTS", {"half": {"gain_scale": 0.5}})
    monkeypatch.setattr(base, "_VARIANT_CLASSES", {})
    return "blip:half"


def test_a_variant_is_the_method_with_its_settings_as_defaults(half: str) -> None:
    cls = method_class(half)
    assert issubclass(cls, BLIPMethod) and cls.name == half
    assert cls.HPARAMS == {**BLIPMethod.HPARAMS, "gain_scale": 0.5}
    assert method_class(half) is cls  # made once
    assert half in method_names() and "blip" in method_names()


@pytest.mark.parametrize("name", ["blip:nope", "finetune:half", "nope:half", "blip:"])
def test_an_unknown_variant_is_named(half: str, name: str) -> None:
    with pytest.raises(ValueError, match=f"unknown method {name!r}"):
        method_class(name)


def test_compare_runs_variants_beside_the_method(half: str, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "cmp"
    assert cli_main(["compare", "--methods", f"blip,{half}", "--seeds", "0", "--out", str(out),
                     "--no-plots", *SMALL]) == 0
    table = (out / "compare.md").read_text()
    assert "| blip |" in table and f"| {half} |" in table
    runs = {m: json.loads((out / f"pdigits-{m}-seed0" / "results.json").read_text())
            for m in ("blip", half)}
    assert runs[half]["method"] == half
    assert runs[half]["method_hparams"]["values"]["gain_scale"] == 0.5
    assert runs["blip"]["method_hparams"]["values"]["gain_scale"] == 1.0
    # half the gain freezes fewer bits
    assert runs[half]["capacity"][-1]["overall"] < runs["blip"]["capacity"][-1]["overall"]


def test_hp_targets_a_variant(half: str) -> None:
    per = compare_hp([f"{half}:gain_scale=0.4", "prior_bits=3"], ["blip", half, "finetune"])
    assert per[half] == {"gain_scale": 0.4, "prior_bits": 3}
    assert per["blip"] == {"prior_bits": 3} and per["finetune"] == {}


def test_a_preset_does_not_override_what_the_variant_sets(monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    from blip.classification.trainer import TrainConfig, resolved_hparams

    monkeypatch.setattr(BLIPMethod, "VARIANTS", {"prior": {"F_prior": 1e-13}})
    monkeypatch.setattr(base, "_VARIANT_CLASSES", {})
    plain = resolved_hparams(TrainConfig.from_preset("pdigits", method="blip"))["values"]
    cfg = TrainConfig.from_preset("pdigits", method="blip:prior")
    assert plain["F_prior"] == 1e-15  # the preset's
    assert resolved_hparams(cfg)["values"]["F_prior"] == 1e-13  # the variant's
    # an explicit setting still wins over both
    cfg = TrainConfig.from_preset("pdigits", method="blip:prior", method_kwargs={"F_prior": 1e-14})
    assert resolved_hparams(cfg)["values"]["F_prior"] == 1e-14
