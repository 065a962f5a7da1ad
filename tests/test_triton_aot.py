"""The Triton ahead-of-time check, on a sample: every kernel and every autotune config
compiles for sm_90 with no register spill (the full run is CI's
``python3 -m blip_kernels.triton.aot_check --arch 90,80``).

It runs in a child process: the check needs the kernels decorated for compilation,
while this test session may have them decorated for the interpreter.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    # TRITON_INTERPRET=1 (as this session has it) is inherited on purpose: the check must
    # switch itself to compilation, whatever the CI environment exports.
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "blip_kernels.triton.aot_check", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_every_kernel_and_config_compiles_for_sm90_without_spills(tmp_path: Path) -> None:
    out = tmp_path / "aot.json"
    proc = _run("--arch", "90", "--sample", "1", "--json", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(out.read_text())["rows"]
    for r in rows:
        assert r["ok"], r
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, r
        assert r["arch"] == 90
    kernels = {r["kernel"] for r in rows}
    assert kernels == {"_quantize_kernel", "_project_kernel", "_sync_kernel", "_sgd_project_kernel",
                       "_update_bits_kernel", "_fisher_linear2d_kernel", "_fisher_persample_kernel"}
    from blip_kernels.triton import fisher

    configs = {k: {r["config"] for r in rows if r["kernel"] == k} for k in kernels}
    assert len(configs["_fisher_linear2d_kernel"]) == len(fisher.LINEAR_CONFIGS)
    assert len(configs["_fisher_persample_kernel"]) == len(fisher.PERSAMPLE_CONFIGS)
    # The sample is the first launch per config: the bias reduction with fp32 grad_out on
    # the split path, which failed to compile before the fix (issue 10, "Why" item 2).
    persample = {r["case"] for r in rows if r["kernel"] == "_fisher_persample_kernel"}
    assert persample == {"linear3d 4x10x24->20 fp32/fp32 bias split=3"}


def test_bad_arguments_are_named() -> None:
    proc = _run("--arch", "nine", timeout=120)
    assert proc.returncode == 2 and "--arch" in proc.stderr
    proc = _run("--arch", "90", "--kernel", "_no_such_kernel", timeout=120)
    assert proc.returncode == 2 and "_no_such_kernel" in proc.stderr
    proc = _run("--arch", "90", "--json", "/nonexistent-dir/aot.json", timeout=120)
    assert proc.returncode == 2 and "--json" in proc.stderr


def test_ptxas_log_parsing() -> None:
    from blip_kernels.triton import _aot

    log = ("ptxas info    : Function properties for k\n"
           "    56 bytes stack frame, 60 bytes spill stores, 52 bytes spill loads\n"
           "ptxas info    : Used 255 registers, used 1 barriers, 56 bytes cumulative stack size\n")
    assert _aot.parse_ptxas_log(log) == (255, 56, 60, 52)
    with pytest.raises(_aot.TritonInternalsChanged, match="no register/spill counts"):
        _aot.parse_ptxas_log("ptxas info    : nothing here")


def test_layer_like_shapes_are_recorded() -> None:
    """Beyond the odd shapes: the models' and the GPU benchmark's layers, each dtype, so the
    divisibility specialisations real layers get are compiled too (spills showed up only
    there under triton 3.7, e.g. the benchmark's conv 64->128 in bf16 on sm_90)."""
    proc = _run("--list", timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    cases = [ln.split("\t") for ln in proc.stdout.splitlines() if "\t" in ln]
    persample = {c for k, c in cases if k == "_fisher_persample_kernel"}
    linear2d = {c for k, c in cases if k == "_fisher_linear2d_kernel"}
    for dt in ("fp32/fp32", "bf16/bf16", "fp16/fp16"):
        assert f"bench conv3x3 s1p1 64->128 32x32 {dt} bias" in persample
        assert f"bench linear3d 8x128x1024->1024 {dt}" in persample
        assert f"ResNet conv3x3 s1p1 64->64 16x16 {dt}" in persample
        assert f"MLP linear2d 64x784->1200 {dt}" in linear2d  # no bias
    assert sum("ResNet" in c for c in persample) >= 15
    assert sum("AlexNet" in c for c in persample) == 9


def test_layer_cases_split_over_samples_as_an_h100_would() -> None:
    from blip_kernels.triton import aot_check

    h100 = aot_check._split_as(aot_check.ON_H100)
    # 2 x 132 SMs worth of programs, at most 64 per tile and at most one per sample
    assert h100(64, 18, None) == 15  # conv 64->128 3x3: 2 x 9 tiles of 64 x 64
    assert h100(64, 1, None) == 64
    assert h100(8, 1, None) == 8
    assert h100(64, 1000, None) == 1
    assert aot_check._split_as(3)(2, 5, None) == 2
