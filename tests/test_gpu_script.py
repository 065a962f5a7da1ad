"""GPU readiness without a GPU: the one-shot GPU script's CPU rehearsal, the CUDA toolkit
search shared by setup.py and CMakeLists.txt (csrc/cuda/toolkit.py), and ptxas's
register report of the CUDA kernels."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "csrc" / "cuda"))
import toolkit  # noqa: E402 - csrc/cuda/toolkit.py (a script, not a package)

sys.path.insert(0, str(ROOT / "benchmarks" / "gpu"))
import ptxas_report  # noqa: E402

STEPS = ["env", "build", "backends", "op_tests_cpp", "op_tests_triton", "bench", "train_blip",
         "train_finetune", "graph_step", "triton_tests", "index64", "properties"]


def _run_script(out: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / "benchmarks/gpu/run_all.sh"), str(out), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})}, check=False)


def _results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


# ------------------------------------------------------------------ the GPU script


def test_dry_run_passes_every_step_and_writes_the_results(tmp_path):
    out = tmp_path / "out"
    proc = _run_script(out, "--dry-run")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = _results(out)
    assert [s["name"] for s in res["steps"]] == STEPS
    assert {s["name"]: s["status"] for s in res["steps"]} == dict.fromkeys(STEPS, "passed")
    assert all(s["seconds"] > 0 for s in res["steps"])
    tests = {s["name"]: s["details"]["counts"] for s in res["steps"]
             if "tests" in s["name"] or s["name"] == "properties"}
    assert len(tests) == 4
    assert all(c.get("passed", 0) > 0 and not c.get("failed") for c in tests.values()), tests
    # the benchmark rows carry their same-run ratios, and none failed
    rows = res["bench"]
    assert rows and not [r for r in rows if "error" in r]
    assert {r["group"].split("/")[0] for r in rows} >= {
        "step", "project", "quantize_ste", "sync", "fisher_linear", "fisher_linear_seq",
        "fisher_conv2d", "train_step"}
    assert all("fraction_of_copy_bw" in r for r in rows if r["group"].startswith("step/"))
    assert all(r["TFLOP_per_s"] > 0 for r in rows if r["group"].startswith("fisher"))
    train = {s["name"]: s["details"] for s in res["steps"] if s["name"].startswith("train_")}
    assert all(0 <= d["acc"] <= 1 and d["complete"] for d in train.values()), train
    md = (out / "results.md").read_text()
    assert all(f"| {name} | passed |" in md for name in STEPS)
    log = (out / "run.log").read_text()
    assert all(f"===== {name}:" in log for name in STEPS)
    # what the device tool returns: at most 8 plain files, two folders deep at most
    files = list(out.rglob("*"))
    assert len(files) <= 8 and all(f.is_file() for f in files), files


def test_a_failing_step_is_recorded_and_the_next_steps_still_run(tmp_path):
    out = tmp_path / "out"
    # A selection that matches nothing: pytest exits 5, which must count as a failure (on
    # a GPU a CUDA selection that matches nothing means CUDA was not there).
    proc = _run_script(out, "--dry-run", "--only", "op_tests_cpp,index64",
                       env={"PYTEST_ADDOPTS": "-m no_test_has_this_marker"})
    assert proc.returncode == 1
    steps = {s["name"]: s for s in _results(out)["steps"]}
    assert list(steps) == ["op_tests_cpp", "index64"]
    assert steps["op_tests_cpp"]["status"] == "failed" and steps["op_tests_cpp"]["rc"] == 5
    assert steps["index64"]["status"] == "passed"
    assert "| op_tests_cpp | failed |" in (out / "results.md").read_text()


def test_steps_past_the_time_budget_are_recorded_as_skipped(tmp_path):
    out = tmp_path / "out"
    proc = _run_script(out, "--dry-run", "--budget", "0")
    assert proc.returncode == 1
    assert {s["status"] for s in _results(out)["steps"]} == {"skipped"}


def test_script_without_out_dir_prints_usage():
    proc = subprocess.run(["bash", str(ROOT / "benchmarks/gpu/run_all.sh"), "--dry-run"],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 2 and "usage" in proc.stderr


# ------------------------------------------------------------------ toolkit search


def _fake_toolkit(root: Path, version: int = 13000, answers_dryrun: bool = True) -> Path:
    (root / "bin").mkdir(parents=True)
    (root / "include").mkdir()
    (root / "include" / "cuda_runtime_api.h").write_text(f"#define CUDART_VERSION {version}\n")
    nvcc = root / "bin" / "nvcc"
    body = f'echo "#$ TOP={root}/bin/.."' if answers_dryrun else "exit 1"
    nvcc.write_text(f"#!/bin/sh\n{body}\n")
    nvcc.chmod(0o755)
    return root


def _wrapper(dirpath: Path, target: Path) -> Path:
    # Like /usr/local/bin/nvcc here: a script outside the toolkit that execs the real one.
    dirpath.mkdir()
    w = dirpath / "nvcc"
    w.write_text(f'#!/bin/sh\nexec {target}/bin/nvcc "$@"\n')
    w.chmod(0o755)
    return dirpath


@pytest.mark.parametrize("answers_dryrun", [True, False], ids=["asks-nvcc", "reads-exec-line"])
def test_toolkit_behind_a_wrapper_nvcc_on_path(tmp_path, answers_dryrun):
    real = _fake_toolkit(tmp_path / "cuda-13.0", answers_dryrun=answers_dryrun)
    path = _wrapper(tmp_path / "wrapbin", real)
    found = toolkit.find_toolkit("13.0", env={"PATH": str(path)})
    assert found.root == real.resolve() and found.version == (13, 0)


def test_explicit_cuda_home_without_headers_is_an_error_naming_it(tmp_path):
    bad = tmp_path / "not-a-toolkit"
    (bad / "bin").mkdir(parents=True)
    (bad / "bin" / "nvcc").write_text("")
    with pytest.raises(toolkit.ToolkitError, match=r"CUDA_HOME=.*include/cuda_runtime_api\.h"):
        toolkit.find_toolkit("13.0", env={"CUDA_HOME": str(bad), "PATH": ""})


def test_major_version_must_match_torch(tmp_path):
    old = _fake_toolkit(tmp_path / "cuda-12.4", version=12040)
    with pytest.raises(toolkit.ToolkitError, match=r"CUDA 12\.4 but torch was built with CUDA 13"):
        toolkit.find_toolkit("13.0", env={"CUDA_PATH": str(old), "PATH": ""})
    assert toolkit.find_toolkit("12.1", env={"CUDA_PATH": str(old)}).version == (12, 4)


def test_arch_list():
    assert toolkit.gencode_flags(toolkit.DEFAULT_ARCH) == [
        "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
        "-gencode=arch=compute_90,code=compute_90"]
    assert toolkit.cmake_architectures("8.0;9.0+PTX") == "80-real;90"
    assert toolkit.gencode_flags("9.0a") == ["-gencode=arch=compute_90a,code=sm_90a"]
    for bad in ("sm_90", "", "9"):
        with pytest.raises(ValueError, match="BLIP_CUDA_ARCH"):
            toolkit.parse_arch_list(bad)


@pytest.mark.skipif(bool(torch.version.cuda), reason="checks the CPU-torch refusal")
def test_setup_refuses_blip_cuda_1_with_cpu_torch():
    proc = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=ROOT,
                          env={**os.environ, "BLIP_CUDA": "1"}, capture_output=True, text=True,
                          check=False)
    assert proc.returncode != 0 and "CPU-only build" in proc.stderr


def test_setup_rejects_a_bad_blip_cuda_value():
    proc = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=ROOT,
                          env={**os.environ, "BLIP_CUDA": "yes"}, capture_output=True,
                          text=True, check=False)
    assert proc.returncode != 0 and "BLIP_CUDA='yes'" in proc.stderr


# ------------------------------------------------------------------ ptxas


def test_cuda_kernels_do_not_spill():
    try:
        toolkit.find_toolkit()
    except toolkit.ToolkitError as exc:
        pytest.skip(f"no CUDA toolkit to compile with: {exc}")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks/gpu/ptxas_report.py"),
                           "--arch", "80,90", "--fail-on-spill",
                           *map(str, sorted((ROOT / "csrc/cuda").glob("*.cu")))],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    rows = [ln for ln in proc.stdout.splitlines() if "persample_fisher_kernel" in ln]
    assert len(rows) == 24  # 3 dtypes x linear/conv x int32/int64 x 2 archs
    calls = {ln.rstrip(" |").rsplit("|", 1)[1].strip() for ln in rows if "int32" in ln}
    # No int64 div/mod subroutines on the 32-bit path ("?" only where no cuobjdump exists
    # to count them: the Triton package and the toolkit both ship one).
    assert calls == {"0"} or (calls == {"?"} and ptxas_report._cuobjdump() is None), calls


def test_bench_records_a_failing_variant_and_times_the_others(tmp_path, monkeypatch):
    import bench  # benchmarks/gpu/bench.py

    def broken(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise RuntimeError("planted failure")

    monkeypatch.setattr(bench.bk, "fisher_conv2d_", broken)
    out = tmp_path / "bench.json"
    threads = torch.get_num_threads()  # --tiny sets one thread: give the session its own back
    try:
        assert bench.main([str(out), "--tiny", "--device", "cpu", "--repeats", "1"]) == 1
    finally:
        torch.set_num_threads(threads)
    rows = [r for r in json.loads(out.read_text())["rows"] if r["group"].startswith("fisher_conv")]
    failed = {r["variant"] for r in rows if "error" in r}
    assert failed == set(bench._backends(torch.device("cpu")))
    assert all("planted failure" in r["error"] for r in rows if "error" in r)
    timed = {r["variant"]: r for r in rows if "seconds" in r}
    assert set(timed) == {"gemm-only", "replication"}
    assert timed["replication"]["speed_vs_gemm-only"] > 0
