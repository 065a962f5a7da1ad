"""Driver of benchmarks/gpu/run_all.sh: every GPU check in one run, results in one folder.

    python3 benchmarks/gpu/run_all.py OUT_DIR [--dry-run] [--budget SECONDS] [--build]
                                      [--only STEP,...]

Made for one try on a machine lent for minutes: the steps run in order of value, each a
subprocess (its whole process group) with its own time limit; a failing step is recorded
and the run goes on; a step that would start past the budget (default 420 s) is recorded
as skipped. The results are rewritten after every step and every output line goes to
run.log as it is printed, so a run killed from outside still leaves what it finished.

  env          python, torch, triton, setuptools, GPU, toolkit
  build        blip_kernels._C with CUDA for this card's arch only (MAX_JOBS = cores)
  backends     cpp and triton really usable on CUDA, _C.has_cuda()
  op_tests_cpp tests/test_ops.py on CUDA for cpp and reference (fast, compiles nothing)
  bench        benchmarks/gpu/bench.py: bandwidth vs copy, Fisher vs GEMM, train step
  op_tests_triton   tests/test_ops.py on CUDA for Triton (compile-heavy: after bench)
  graph_step   the CUDA-graph step against autograd (issue 18)
  train_blip, train_finetune   `python -m blip train --device cuda` on pdigits
  triton_tests tests/test_triton_backend.py on CUDA (Triton vs the reference)
  index64      benchmarks/gpu/check_index64.py: Fisher past 2^31 elements
  properties   tests/test_ops_properties.py on CUDA (hypothesis)

``--dry-run`` runs the same steps on CPU tensors with the CPU backends and tiny sizes
(the rehearsal; the build step only resolves the toolkit and arch unless ``--build``,
which builds as on the GPU when this torch has CUDA, CPU-only otherwise).
OUT_DIR gets exactly the files in OUTPUT_FILES, no folders (the device tool returns at
most 8 files, two folders deep).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
PY = sys.executable

#: Everything the script writes into OUT_DIR (tests/test_gpu_script.py holds it to this).
OUTPUT_FILES = ("results.json", "results.md", "run.log", "bench.json", "graph_step.json")
DEFAULT_BUDGET = 420.0

ENV_SNIPPET = r"""
import importlib.metadata as md, os, platform, shutil, subprocess, sys
import torch
print("python", sys.version.split()[0], sys.executable)
print("torch", torch.__version__, "CUDA", torch.version.cuda, "| cuda available:",
      torch.cuda.is_available())
try:
    import triton; print("triton", triton.__version__)
except ImportError as e:
    print("triton: not importable:", e)
for name in ("numpy", "setuptools", "ninja", "pytest", "pytest-xdist", "pytest-timeout",
             "hypothesis", "scikit-learn"):
    try:
        print(" ", name, md.version(name))
    except md.PackageNotFoundError:
        print(" ", name, "NOT INSTALLED")
print("cpus", os.cpu_count(), platform.processor() or platform.machine())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs",
          round(p.total_memory / 2**30, 1), "GiB")
if shutil.which("nvidia-smi"):
    subprocess.run(["nvidia-smi", "--query-gpu=name,compute_cap,driver_version,memory.total",
                    "--format=csv"], check=False, timeout=30)
sys.path.insert(0, "csrc/cuda")
import toolkit
try:
    tk = toolkit.find_toolkit(torch.version.cuda)
    print("toolkit", tk.root, tk.version)
except toolkit.ToolkitError as e:
    print("toolkit: NOT FOUND:", e)
"""

BACKENDS_SNIPPET = r"""
import sys, torch, blip_kernels as bk
from blip_kernels import cpp_backend
dev = sys.argv[1]
print("available_backends(%r) =" % dev, bk.available_backends(dev))
for name in ("reference", "cpp", "triton"):
    print(" ", name, "->", bk.unavailable_reason(name, dev) or "ok")
problems = []
if cpp_backend._C is None:
    problems.append("blip_kernels._C did not import")
elif dev == "cuda" and not cpp_backend._C.has_cuda():
    problems.append("blip_kernels._C has no CUDA kernels")
need = ["reference", "cpp"] + (["triton"] if dev == "cuda" else [])
problems += [f"{n} unavailable on {dev}" for n in need if bk.unavailable_reason(n, dev)]
if dev == "cuda" and not torch.cuda.is_available():
    problems.append("torch.cuda.is_available() is False")
if problems:
    sys.exit("; ".join(problems))
"""


@dataclass
class Step:
    name: str
    argv: list[str]
    timeout: float
    env: dict[str, str] = field(default_factory=dict)
    # What to read into the step's record afterwards: "pytest" (counts, failed ids), a
    # run directory (blip train's results.json), or fixed details (the build's arch).
    collect: str | Path | dict | None = None


@dataclass
class Record:
    name: str
    status: str  # pending | running | passed | failed | timeout | skipped
    seconds: float
    rc: int | None
    command: str
    note: str = ""
    details: dict = field(default_factory=dict)


def gpu_arch(dry_run: bool) -> tuple[str, str]:
    """(BLIP_CUDA_ARCH value, where it came from): the card's compute capability."""
    if dry_run:
        return "9.0", "placeholder (dry run: no GPU)"
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "--query-gpu=compute_cap", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=30, check=True)
            cap = out.stdout.strip().splitlines()[0].strip()
            if re.fullmatch(r"\d+\.\d+", cap):
                return cap, "nvidia-smi compute_cap"
        except (OSError, subprocess.SubprocessError, IndexError):
            pass
    try:
        import torch  # noqa: PLC0415 - only when nvidia-smi could not say

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(0)
            return f"{major}.{minor}", "torch.cuda.get_device_capability"
    except ImportError:
        pass
    return "9.0", "default (no nvidia-smi answer and no CUDA in torch)"


_OUTCOME = re.compile(r"\b(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")


_SUMMARY = re.compile(r"^(=+ )?\d+ (passed|failed|errors?|skipped|deselected|xfailed|xpassed)\b")


def pytest_summary(output: str) -> dict:
    """Counts from pytest's last summary line, and the ids of failed tests. A run cut
    short has no summary line: then the counts are tallied from the verbose lines
    (``-v``: one PASSED/FAILED/... per test) and ``partial`` is set."""
    counts: dict[str, int] = {}
    lines = output.splitlines()
    summary = [ln for ln in lines if _SUMMARY.match(ln.strip())]
    partial = not summary and "no tests ran" not in output
    if summary:
        for num, what in re.findall(r"(\d+) (passed|failed|errors?|skipped|deselected|"
                                    r"xfailed|xpassed)", summary[-1]):
            counts[what.rstrip("s") if what.startswith("error") else what] = int(num)
    failed = {ln.split(" ", 1)[1].split(" - ")[0] for ln in lines
              if ln.startswith(("FAILED ", "ERROR "))}
    if partial:  # "tests/x.py::t PASSED [ 10%]", or with xdist "[gw1] [ 10%] PASSED tests/x.py::t"
        for ln in lines:
            m = _OUTCOME.search(ln)
            if "::" not in ln or m is None:
                continue
            key = {"ERROR": "error", "XFAIL": "xfailed", "XPASS": "xpassed"}.get(
                m.group(1), m.group(1).lower())
            counts[key] = counts.get(key, 0) + 1
            if key in ("failed", "error"):
                failed.add(next(w for w in ln.split() if "::" in w))
    return {"counts": counts, "failed_tests": sorted(failed)[:200], "partial": partial}


def train_summary(run_dir: Path) -> dict:
    """ACC/BWT and step time from the run's results.json (the run folder stays out of OUT)."""
    path = run_dir / "results.json"
    if not path.exists():
        return {"error": f"{path} missing"}
    res = json.loads(path.read_text())
    out = {k: res[k] for k in ("acc", "bwt", "bwt_authors", "complete", "total_seconds",
                               "device", "torch", "backend", "backends") if k in res}
    spp = [t.get("seconds_per_step") for t in res.get("tasks", []) if isinstance(t, dict)]
    spp = [s for s in spp if isinstance(s, (int, float))]
    if spp:
        out["seconds_per_step_mean"] = sum(spp) / len(spp)
    return out


def make_steps(out: Path, dry_run: bool, build: bool, scratch: Path) -> list[Step]:
    """The steps in the order they run: the most valuable first (build, the cpp kernels'
    correctness on CUDA, the benchmark), Triton's compile-heavy tests after the benchmark
    so long compiles cannot cost its numbers. Limits sum past the budget on purpose: a
    step that finishes early leaves its time to the next ones."""
    dev = "cpu" if dry_run else "cuda"
    arch, arch_from = gpu_arch(dry_run)
    pytest = [PY, "-m", "pytest", "-v", "-p", "no:cacheprovider", "-rfE"]
    parallel: list[str] = []
    try:
        import xdist  # noqa: F401, PLC0415 - optional: the GPU image has pytest-xdist

        # Triton compiles per specialisation: spread it (the rehearsal uses the same flag).
        parallel = ["-n", "2" if dry_run else "8"]
    except ImportError:
        pass
    try:
        import pytest_timeout  # noqa: F401, PLC0415 - optional: the GPU image has it

        pytest.append("--timeout=90")  # a hung test fails alone, not its whole step
    except ImportError:
        pass
    steps = [Step("env", [PY, "-c", ENV_SNIPPET], 60)]
    if dry_run and not build:
        steps.append(Step("build", [PY, str(ROOT / "csrc/cuda/toolkit.py"), "gencode"], 60,
                          {"BLIP_CUDA_ARCH": arch}))
    else:
        # The rehearsal with --build under a CUDA torch runs the GPU command exactly.
        import torch  # noqa: PLC0415 - only to know whether this torch has CUDA

        cuda = "1" if (torch.version.cuda or not dry_run) else "0"
        steps.append(Step(
            "build", [PY, str(HERE / "build_ext.py")], 300,
            {"BLIP_CUDA": cuda, "BLIP_CUDA_ARCH": arch, "MAX_JOBS": str(os.cpu_count() or 16)}))
    steps[-1].collect = {"arch": arch, "arch_from": arch_from}
    steps.append(Step("backends", [PY, "-c", BACKENDS_SNIPPET, dev], 90))
    ops = "tests/test_ops.py"
    if dry_run:  # a few of each kind; the Triton interpreter is too slow for all
        cpp_sel = [ops, "-k", "cpp-cpu and (conformance or fisher_linear)", *parallel]
        triton_sel = [ops, "-k", "triton-cpu and conformance_quantize"]
        tri_sel = ["tests/test_triton_backend.py", "-k", "vectors_quantize"]
        prop_sel = ["tests/test_ops_properties.py", "-k", "cpp-cpu"]
    else:
        cpp_sel = [ops, "-k", "cpp-cuda or reference-cuda", *parallel]
        triton_sel = [ops, "-k", "triton-cuda", *parallel]
        tri_sel = ["tests/test_triton_backend.py", *parallel]
        prop_sel = ["tests/test_ops_properties.py", "-k", "cuda"]
    tiny = ["--tiny", "--device", "cpu"] if dry_run else []
    steps += [
        Step("op_tests_cpp", pytest + cpp_sel, 120, collect="pytest"),
        Step("bench", [PY, str(HERE / "bench.py"), str(out / "bench.json"), *tiny], 150),
        Step("op_tests_triton", pytest + triton_sel, 150, collect="pytest"),
    ]
    # issue 18: the CUDA-graph and fused steps bit-identical to autograd, and their speed-ups
    graph_argv = [PY, str(HERE / "graph_step.py"), "--json", str(out / "graph_step.json")]
    if dry_run:
        graph_argv += ["--device", "cpu", "--steps", "12"]
    steps.append(Step("graph_step", graph_argv, 90))
    for method in ("blip", "finetune"):
        run_dir = scratch / f"train-{method}"
        argv = [PY, "-m", "blip", "train", "--benchmark", "pdigits", "--method", method,
                "--device", dev, "--out", str(run_dir), "--no-plots", "--quiet"]
        if dry_run:
            argv += ["--n-tasks", "2", "--epochs", "1"]
        steps.append(Step(f"train_{method}", argv, 90, collect=run_dir))
    steps += [
        Step("triton_tests", pytest + tri_sel, 120, collect="pytest"),
        Step("index64", [PY, str(HERE / "check_index64.py"), *tiny[:1]], 90),
        Step("properties", pytest + prop_sel, 90, collect="pytest"),
    ]
    return steps


def _command(step: Step) -> str:
    shown = [a if "\n" not in a else f"<{step.name} snippet in run_all.py>" for a in step.argv]
    return " ".join([f"{k}={v}" for k, v in step.env.items()] + shown)


def _kill_group(proc: subprocess.Popen) -> None:
    """End the step and everything it started (pytest-xdist workers, compilers): they
    share its process group, and a survivor would keep running into the next step (or
    hold the log open). Harmless once they have all exited."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def run_step(step: Step, log, remaining: float, base_env: dict[str, str]) -> Record:  # noqa: ANN001
    """Run one step with its output going straight into ``log`` (so it is there even if
    this whole script is killed), and record it."""
    cmd = _command(step)
    if remaining < 5:
        return Record(step.name, "skipped", 0.0, None, cmd, "out of time budget")
    limit = min(step.timeout, remaining)
    log.write(f"\n===== {step.name}: {cmd}\n")
    log.flush()
    print(f"== {step.name} (limit {limit:.0f} s)", flush=True)
    start_at = os.fstat(log.fileno()).st_size  # not log.tell(): the steps append to it too
    t0 = time.perf_counter()
    proc = subprocess.Popen(step.argv, cwd=ROOT, env={**base_env, **step.env}, text=True,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        rc = proc.wait(timeout=limit)
        status = "passed" if rc == 0 else "failed"
    except subprocess.TimeoutExpired:
        rc, status = None, "timeout"
    finally:
        _kill_group(proc)
    seconds = time.perf_counter() - t0
    log.flush()
    with open(log.name, "rb") as fh:
        fh.seek(start_at)
        output = fh.read().decode(errors="replace")
    log.write(f"\n----- {step.name}: {status} in {seconds:.1f} s (rc {rc})\n")
    log.flush()
    rec = Record(step.name, status, seconds, rc, cmd)
    if step.collect == "pytest":
        rec.details = pytest_summary(output)
        rec.note = ", ".join(f"{v} {k}" for k, v in rec.details["counts"].items())
        if rec.details["partial"]:
            rec.note += " (cut short)"
    elif isinstance(step.collect, Path):
        rec.details = train_summary(step.collect)
        if "acc" in rec.details:
            rec.note = f"ACC {rec.details['acc']:.4f}"
    elif isinstance(step.collect, dict):
        rec.details = dict(step.collect)
        rec.note = f"arch {step.collect['arch']} ({step.collect['arch_from']})"
    if status != "passed" and not rec.note:
        tail = [ln for ln in output.strip().splitlines() if ln.strip()][-1:] or [""]
        rec.note = tail[0][:200]
    print(f"   {status} in {seconds:.1f} s  {rec.note}", flush=True)
    return rec


def _fmt(v: object, spec: str = ".3g") -> str:
    return "" if v is None else format(v, spec) if isinstance(v, (int, float)) else str(v)


def write_markdown(path: Path, meta: dict, records: list[Record], bench: list[dict]) -> None:
    state = "" if meta.get("finished") else " · IN PROGRESS (written after every step)"
    lines = [f"# GPU script results ({'dry run, CPU' if meta['dry_run'] else 'CUDA'})", "",
             f"{meta['started']} · {meta['host']} · total {meta['total_seconds']:.0f} s of a "
             f"{meta['budget_seconds']:.0f} s budget{state}", "",
             "| step | status | seconds | note |", "|---|---|---|---|"]
    lines += [f"| {r.name} | {r.status} | {r.seconds:.1f} | {r.note.replace('|', '/')} |"
              for r in records]
    if bench:
        lines += ["", "## Kernels (medians; ratios against baselines of the same run)", "",
                  "| case | variant | ms | GB/s | of copy bw | TFLOP/s | vs GEMM | "
                  "vs replication | peak extra MB | vs finetune |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in bench:
            if "error" in r:
                err = r["error"][:120].replace("|", "/")
                lines.append(f"| {r['group']} | {r['variant']} FAILED: {err} | | | | | | | | |")
                continue
            vs_gemm = next((v for k, v in r.items() if k.startswith("speed_vs_")), None)
            frac = r.get("fraction_of_copy_bw")
            ovh = r.get("overhead_vs_finetune")
            lines.append(
                f"| {r['group']} | {r['variant']} | {r['seconds'] * 1e3:.4g} | "
                f"{_fmt(r.get('GB_per_s'))} | {'' if frac is None else f'{100 * frac:.0f}%'} | "
                f"{_fmt(r.get('TFLOP_per_s'))} | {_fmt(vs_gemm)} | "
                f"{_fmt(r.get('speedup_vs_replication'))} | {_fmt(r.get('peak_extra_MB'))} | "
                f"{'' if ovh is None else f'{100 * ovh:+.1f}%'} |")
    trains = [r for r in records if r.name.startswith("train_") and r.details]
    if trains:
        lines += ["", "## blip train (pdigits)", "", "| method | ACC | BWT | s/step | seconds |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r.name[6:]} | {_fmt(r.details.get('acc'), '.4f')} | "
                  f"{_fmt(r.details.get('bwt'), '.4f')} | "
                  f"{_fmt(r.details.get('seconds_per_step_mean'))} | {r.seconds:.1f} |"
                  for r in trains]
    _replace(path, "\n".join(lines) + "\n")


def _replace(path: Path, text: str) -> None:
    """Write whole or not at all (a kill mid-write must not leave half a results.json)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _bench_rows(out: Path) -> list[dict]:
    try:
        return json.loads((out / "bench.json").read_text()).get("rows", [])
    except (OSError, ValueError):  # not written yet, or being rewritten
        return []


def write_results(out: Path, meta: dict, records: list[Record]) -> None:
    bench = _bench_rows(out)
    _replace(out / "results.json", json.dumps(
        {**meta, "steps": [r.__dict__ for r in records], "bench": bench}, indent=1))
    write_markdown(out / "results.md", meta, records, bench)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--dry-run", action="store_true",
                    help="CPU rehearsal: same steps, CPU tensors, tiny sizes")
    ap.add_argument("--budget", type=float, default=DEFAULT_BUDGET,
                    help=f"seconds for all steps together (default {DEFAULT_BUDGET:.0f})")
    ap.add_argument("--build", action="store_true",
                    help="with --dry-run: really build (with CUDA when torch has it)")
    ap.add_argument("--only", default="", help="comma-separated step names to run")
    args = ap.parse_args(argv)
    out = args.out_dir.resolve()
    out.mkdir(parents=True, exist_ok=True)
    for name in OUTPUT_FILES:
        (out / name).unlink(missing_ok=True)
        (out / (name + ".tmp")).unlink(missing_ok=True)
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    base_env = dict(os.environ)
    base_env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT)] + ([base_env["PYTHONPATH"]] if base_env.get("PYTHONPATH") else []))
    base_env["PYTHONUNBUFFERED"] = "1"
    if args.dry_run:
        base_env["CUDA_VISIBLE_DEVICES"] = ""  # the rehearsal must not touch a GPU
    t_start = time.perf_counter()
    meta = {"started": started, "host": os.uname().nodename, "dry_run": args.dry_run,
            "total_seconds": 0.0, "budget_seconds": args.budget, "python": PY,
            "finished": False}
    with tempfile.TemporaryDirectory(prefix="blip-gpu-") as scratch, \
            open(out / "run.log", "a") as log:
        steps = make_steps(out, args.dry_run, args.build, Path(scratch))
        only = {s for s in args.only.split(",") if s}
        if unknown := only - {s.name for s in steps}:
            ap.error(f"--only: unknown step(s) {sorted(unknown)}")
        steps = [s for s in steps if not only or s.name in only]
        records = [Record(s.name, "pending", 0.0, None, _command(s)) for s in steps]
        write_results(out, meta, records)
        for i, step in enumerate(steps):
            elapsed = time.perf_counter() - t_start
            records[i].status = "running"
            meta["total_seconds"] = elapsed
            write_results(out, meta, records)
            records[i] = run_step(step, log, args.budget - elapsed, base_env)
            meta["total_seconds"] = time.perf_counter() - t_start
            write_results(out, meta, records)
    meta["total_seconds"] = time.perf_counter() - t_start
    meta["finished"] = True
    write_results(out, meta, records)
    bad = [r.name for r in records if r.status != "passed"]
    print(f"== {len(records) - len(bad)}/{len(records)} steps passed in "
          f"{meta['total_seconds']:.0f} s"
          + (f"; not passed: {', '.join(bad)}" if bad else "") + f"; results in {out}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
