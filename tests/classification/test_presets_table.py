"""`blip presets` prints a table a reader can scan, not Python dicts."""

from __future__ import annotations

from dataclasses import fields

import pytest

from blip.classification.presets import PRESETS, Preset
from blip.cli import main


def test_presets_prints_one_aligned_row_per_benchmark(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert "{" not in out and "'" not in out  # no dict reprs
    lines = out.splitlines()
    header, rule, rows = lines[0], lines[1], lines[2 : 2 + len(PRESETS)]
    assert header.split()[0] == "benchmark" and set(rule) <= {"-", " "}
    assert [r.split()[0] for r in rows] == list(PRESETS)
    n_cols = 1 + len([f for f in fields(Preset) if f.name != "note"])
    assert len(header.split()) == n_cols and all(len(r.split()) == n_cols for r in rows)
    # columns line up: every row's cells end where the header's do (numbers right-aligned)
    ends = [i for i, c in enumerate(header) if c != " " and (i + 1 == len(header)
                                                            or header[i + 1] == " ")]
    for r in rows:
        assert all(r[e] != " " for e in ends[2:]), r
    pd = rows[0].split()
    assert pd[:5] == ["pdigits", "mlp", "0.1", "16", "30"] and "1e-15" in pd
    assert "miniimagenet --model resnet18: F_prior=1e-16, width=1.5" in out
    assert "pdigits: embedded default" in out
