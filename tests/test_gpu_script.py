"""GPU readiness without a GPU: the one-shot GPU script's CPU rehearsal, the CUDA toolkit
search shared by setup.py and CMakeLists.txt (csrc/cuda/toolkit.py), and ptxas's
register report of the CUDA kernels."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "csrc" / "cuda"))
import toolkit  # noqa: E402 - csrc/cuda/toolkit.py (a script, not a package)

sys.path.insert(0, str(ROOT / "benchmarks" / "gpu"))
import ptxas_report  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks" / "gpu"))
import build_ext  # noqa: E402 - benchmarks/gpu/build_ext.py
import run_all  # noqa: E402 - benchmarks/gpu/run_all.py

# The order is the point: what only a GPU can tell and is fast first, the compile-heavy
# Triton tests after the benchmark.
STEPS = ["env", "build", "backends", "op_tests_cpp", "bench", "op_tests_triton", "graph_step",
         "train_blip", "train_finetune", "triton_tests", "index64", "properties"]


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
    assert res["finished"] and res["budget_seconds"] == run_all.DEFAULT_BUDGET
    assert json.loads((out / "bench.json").read_text())["complete"]
    # what the device tool returns: at most 8 plain files, two folders deep at most, named
    # in letters, digits, '.', '_' and '-'; here: exactly the files the script declares
    files = list(out.rglob("*"))
    assert sorted(f.name for f in files) == sorted(run_all.OUTPUT_FILES)
    assert len(files) <= 8 and all(f.is_file() and f.parent == out for f in files), files
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", f.name) for f in files)


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


def test_results_are_written_before_each_step_and_after_it(tmp_path, monkeypatch):
    """A run killed from outside (the device command's timeout) keeps what finished: the
    second step reads results.json while it runs and finds the first passed and itself
    running."""
    out = tmp_path / "out"
    check = textwrap.dedent(f"""
        import json
        d = json.load(open({str(out / "results.json")!r}))
        got = [(s["name"], s["status"]) for s in d["steps"]]
        assert got == [("first", "passed"), ("second", "running"), ("third", "pending")], got
        assert not d["finished"]
        print("saw", got)
    """)
    steps = [run_all.Step("first", [sys.executable, "-c", "print('one')"], 60),
             run_all.Step("second", [sys.executable, "-c", check], 60),
             run_all.Step("third", [sys.executable, "-c", "print('three')"], 60)]
    monkeypatch.setattr(run_all, "make_steps", lambda *a: steps)
    assert run_all.main([str(out)]) == 0
    res = _results(out)
    assert [s["status"] for s in res["steps"]] == ["passed"] * 3 and res["finished"]
    log = (out / "run.log").read_text()
    assert "saw [('first', 'passed'), ('second', 'running')" in log


def test_a_step_past_its_limit_is_killed_with_everything_it_started(tmp_path):
    """pytest-xdist workers and compilers are grandchildren: a timeout ends the whole
    process group, and the step's output up to then is kept."""
    pid_file = tmp_path / "grandchild.pid"
    code = textwrap.dedent(f"""
        import subprocess, sys, time
        g = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        open({str(pid_file)!r}, "w").write(str(g.pid))
        print("grandchild started", flush=True)
        time.sleep(600)
    """)
    step = run_all.Step("hangs", [sys.executable, "-c", code], 600)
    log_path = tmp_path / "run.log"
    with open(log_path, "a") as log:
        rec = run_all.run_step(step, log, 15.0, dict(os.environ))  # the budget left: 15 s
    assert rec.status == "timeout" and rec.rc is None
    assert "grandchild started" in log_path.read_text()
    pid = int(pid_file.read_text())
    for _ in range(400):  # SIGKILL is asynchronous: wait until it is gone (or a zombie)
        status = Path(f"/proc/{pid}/status")
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        if status.exists() and "zombie" in status.read_text():
            break
        time.sleep(0.05)
    else:
        os.kill(pid, signal.SIGKILL)
        raise AssertionError(f"grandchild {pid} outlived its step")


def test_pytest_counts_of_a_run_cut_short_come_from_the_verbose_lines():
    whole = "tests/t.py::a PASSED  [ 50%]\n======= 1 failed, 3 passed, 2 deselected in 1.0s ===\n"
    assert run_all.pytest_summary(whole)["counts"] == {"failed": 1, "passed": 3,
                                                       "deselected": 2}
    assert not run_all.pytest_summary(whole)["partial"]
    cut = ("[gw0] [ 10%] PASSED tests/test_ops.py::test_a[triton-cuda]\n"
           "[gw1] [ 20%] FAILED tests/test_ops.py::test_b[triton-cuda-7]\n"
           "tests/test_ops.py::test_c[cpp-cuda] PASSED   [ 30%]\n"
           "[gw1] [ 40%] SKIPPED tests/test_ops.py::test_d[cpp-cuda]\n")
    got = run_all.pytest_summary(cut)
    assert got["partial"] and got["counts"] == {"passed": 2, "failed": 1, "skipped": 1}
    assert got["failed_tests"] == ["tests/test_ops.py::test_b[triton-cuda-7]"]


def test_unknown_only_step_is_an_error(tmp_path):
    proc = _run_script(tmp_path / "out", "--dry-run", "--only", "bench,no_such_step")
    assert proc.returncode == 2 and "no_such_step" in proc.stderr


# ------------------------------------------------------------------ build step


def _fake_setuptools_wheel(folder: Path, version: str) -> Path:
    folder.mkdir(exist_ok=True)
    whl = folder / f"setuptools-{version}-py3-none-any.whl"
    info = f"setuptools-{version}.dist-info"
    with zipfile.ZipFile(whl, "w") as z:
        z.writestr(f"{info}/METADATA",
                   f"Metadata-Version: 2.1\nName: setuptools\nVersion: {version}\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\n"
                                    "Root-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
    return whl


def test_build_uses_the_installed_setuptools_when_it_reads_pyproject(tmp_path):
    env = build_ext.build_env(tmp_path / "no-wheels", tmp_path, "80.9.0")
    assert env.get("PYTHONPATH") == os.environ.get("PYTHONPATH")
    assert build_ext.version_tuple("77") == (77, 0)


def test_build_with_an_old_setuptools_needs_a_carried_wheel(tmp_path):
    with pytest.raises(SystemExit, match=r"setuptools 69\.5\.1 is installed.*>= 77.*\.whl"):
        build_ext.build_env(tmp_path / "empty", tmp_path, "69.5.1")
    wheels = tmp_path / "wheels"
    _fake_setuptools_wheel(wheels, "70.0.0")  # too old to help
    _fake_setuptools_wheel(wheels, "78.1.0")
    _fake_setuptools_wheel(wheels, "80.9.0")
    assert build_ext.newest_wheel(wheels).name == "setuptools-80.9.0-py3-none-any.whl"
    env = build_ext.build_env(wheels, tmp_path / "scratch", "69.5.1")
    site = tmp_path / "scratch" / "site"
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(site)
    assert (site / "setuptools-80.9.0.dist-info" / "METADATA").exists()


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


def test_device_stack_job_is_an_executable_bash_script_that_parses():
    job = ROOT / ".ci" / "device_stack_job"
    assert os.access(job, os.X_OK)
    assert job.read_text().startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in job.read_text()
    proc = subprocess.run(["bash", "-n", str(job)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
