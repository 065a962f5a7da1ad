"""Driver of benchmarks/gpu/run_all.sh: every GPU check in one run, results in one folder.

    python3 benchmarks/gpu/run_all.py OUT_DIR [--dry-run] [--budget SECONDS] [--build]

Steps, in order of value (each a subprocess with its own time limit; a failing step
is recorded and the run goes on; a step that would start past the budget is recorded
as skipped, so the run ends inside the device lease):

  env          versions, GPU, toolkit
  build        blip_kernels._C with CUDA for this card's arch only (MAX_JOBS=16)
  backends     cpp and triton really usable on CUDA, _C.has_cuda()
  op_tests_cpp, op_tests_triton   tests/test_ops.py on CUDA, per backend, against the
               reference and the conformance vectors; fp32/bf16/fp16
  bench        benchmarks/gpu/bench.py: bandwidth vs copy, Fisher vs GEMM, train step
  train_blip, train_finetune   `python -m blip train --device cuda` on pdigits
  triton_tests tests/test_triton_backend.py on CUDA (Triton vs the reference)
  index64      benchmarks/gpu/check_index64.py: Fisher past 2^31 elements
  properties   tests/test_ops_properties.py on CUDA (hypothesis)

``--dry-run`` runs the same steps on CPU tensors with the CPU backends and tiny sizes
(the rehearsal; the build step only resolves the toolkit and arch unless ``--build``,
which builds as on the GPU when this torch has CUDA, CPU-only otherwise).
OUT_DIR gets at most 4 files (the device tool returns at most 8, two folders deep):
results.json, results.md, run.log (every step's output) and bench.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
PY = sys.executable

ENV_SNIPPET = r"""
import os, platform, subprocess, sys
import torch
print("python", sys.version.split()[0], sys.executable)
print("torch", torch.__version__, "CUDA", torch.version.cuda, "| cuda available:",
      torch.cuda.is_available())
try:
    import triton; print("triton", triton.__version__)
except ImportError as e:
    print("triton: not importable:", e)
print("cpus", os.cpu_count(), platform.processor() or platform.machine())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs",
          round(p.total_memory / 2**30, 1), "GiB")
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
    status: str  # passed | failed | timeout | skipped
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


def pytest_summary(output: str) -> dict:
    """Counts from pytest's last summary line, and the ids of failed tests."""
    counts = {}
    lines = [ln for ln in output.splitlines() if re.search(r"\d+ (passed|failed|error)", ln)]
    if lines:
        for num, what in re.findall(r"(\d+) (passed|failed|errors?|skipped|deselected)",
                                    lines[-1]):
            counts[what.rstrip("s") if what.startswith("error") else what] = int(num)
    failed = [ln.split(" ", 1)[1].split(" - ")[0] for ln in output.splitlines()
              if ln.startswith(("FAILED ", "ERROR "))]
    return {"counts": counts, "failed_tests": failed[:200]}


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
    dev = "cpu" if dry_run else "cuda"
    arch, arch_from = gpu_arch(dry_run)
    pytest = [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE"]
    parallel: list[str] = []
    try:
        import xdist  # noqa: F401, PLC0415 - optional: the GPU image has pytest-xdist

        # Triton compiles per specialisation: spread it (the rehearsal uses the same flag).
        parallel = ["-n", "2" if dry_run else "8"]
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
            "build", [PY, "setup.py", "build_ext", "--inplace"], 420,
            {"BLIP_CUDA": cuda, "BLIP_CUDA_ARCH": arch, "MAX_JOBS": str(os.cpu_count() or 16)}))
    steps[-1].collect = {"arch": arch, "arch_from": arch_from}
    steps.append(Step("backends", [PY, "-c", BACKENDS_SNIPPET, dev], 120))
    try:
        import pytest_timeout  # noqa: F401, PLC0415 - optional: the GPU image has it

        pytest.append("--timeout=120")  # a hung test fails alone, not its whole step
    except ImportError:
        pass
    ops = "tests/test_ops.py"
    if dry_run:  # a few of each kind; the Triton interpreter is too slow for all
        cpp_sel = [ops, "-k", "cpp-cpu and (conformance or fisher_linear)", *parallel]
        triton_sel = [ops, "-k", "triton-cpu and conformance_quantize"]
        tri_sel = ["tests/test_triton_backend.py", "-k", "vectors_quantize"]
        prop_sel = ["tests/test_ops_properties.py", "-k", "cpp-cpu"]
    else:
        # cpp and reference first: fast, and not lost if Triton's compiles run long.
        cpp_sel = [ops, "-k", "cpp-cuda or reference-cuda", *parallel]
        triton_sel = [ops, "-k", "triton-cuda", *parallel]
        tri_sel = ["tests/test_triton_backend.py", *parallel]
        prop_sel = ["tests/test_ops_properties.py", "-k", "cuda"]
    tiny = ["--tiny", "--device", "cpu"] if dry_run else []
    steps += [
        Step("op_tests_cpp", pytest + cpp_sel, 180, collect="pytest"),
        Step("op_tests_triton", pytest + triton_sel, 300, collect="pytest"),
        Step("bench", [PY, str(HERE / "bench.py"), str(out / "bench.json"), *tiny], 300),
    ]
    for method in ("blip", "finetune"):
        run_dir = scratch / f"train-{method}"
        argv = [PY, "-m", "blip", "train", "--benchmark", "pdigits", "--method", method,
                "--device", dev, "--out", str(run_dir), "--no-plots", "--quiet"]
        if dry_run:
            argv += ["--n-tasks", "2", "--epochs", "1"]
        steps.append(Step(f"train_{method}", argv, 150, collect=run_dir))
    # issue 18: the CUDA-graph and fused steps bit-identical to autograd, and their speed-ups
    graph_argv = [PY, str(HERE / "graph_step.py"), "--json", str(out / "graph_step.json")]
    if dry_run:
        graph_argv += ["--device", "cpu", "--steps", "12"]
    steps.append(Step("graph_step", graph_argv, 150))
    steps += [
        Step("triton_tests", pytest + tri_sel, 240, collect="pytest"),
        Step("index64", [PY, str(HERE / "check_index64.py"), *tiny[:1]], 180),
        Step("properties", pytest + prop_sel, 180, collect="pytest"),
    ]
    return steps


def run_step(step: Step, log, remaining: float, base_env: dict[str, str]) -> Record:  # noqa: ANN001
    shown = [a if "\n" not in a else f"<{step.name} snippet in run_all.py>" for a in step.argv]
    cmd = " ".join([f"{k}={v}" for k, v in step.env.items()] + shown)
    if remaining < 5:
        return Record(step.name, "skipped", 0.0, None, cmd, "out of time budget")
    limit = min(step.timeout, remaining)
    log.write(f"\n===== {step.name}: {cmd}\n")
    log.flush()
    print(f"== {step.name} (limit {limit:.0f} s)", flush=True)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(step.argv, cwd=ROOT, env={**base_env, **step.env}, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=limit,
                              check=False)
        output, rc = proc.stdout, proc.returncode
        status = "passed" if rc == 0 else "failed"
    except subprocess.TimeoutExpired as exc:
        raw = exc.stdout or ""
        output = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
        rc, status = None, "timeout"
    seconds = time.perf_counter() - t0
    log.write(output)
    log.write(f"\n----- {step.name}: {status} in {seconds:.1f} s (rc {rc})\n")
    log.flush()
    rec = Record(step.name, status, seconds, rc, cmd)
    if step.collect == "pytest":
        rec.details = pytest_summary(output)
        rec.note = ", ".join(f"{v} {k}" for k, v in rec.details["counts"].items())
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
    lines = [f"# GPU script results ({'dry run, CPU' if meta['dry_run'] else 'CUDA'})", "",
             f"{meta['started']} · {meta['host']} · total {meta['total_seconds']:.0f} s", "",
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
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--dry-run", action="store_true",
                    help="CPU rehearsal: same steps, CPU tensors, tiny sizes")
    ap.add_argument("--budget", type=float, default=470.0,
                    help="seconds for all steps together (default 470: inside 8 minutes)")
    ap.add_argument("--build", action="store_true",
                    help="with --dry-run: really build (with CUDA when torch has it)")
    ap.add_argument("--only", default="", help="comma-separated step names to run")
    args = ap.parse_args(argv)
    out = args.out_dir.resolve()
    out.mkdir(parents=True, exist_ok=True)
    for name in ("results.json", "results.md", "run.log", "bench.json"):
        (out / name).unlink(missing_ok=True)
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    base_env = dict(os.environ)
    base_env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT)] + ([base_env["PYTHONPATH"]] if base_env.get("PYTHONPATH") else []))
    base_env["PYTHONUNBUFFERED"] = "1"
    if args.dry_run:
        base_env["CUDA_VISIBLE_DEVICES"] = ""  # the rehearsal must not touch a GPU
    t_start = time.perf_counter()
    records: list[Record] = []
    with tempfile.TemporaryDirectory(prefix="blip-gpu-") as scratch, \
            open(out / "run.log", "w") as log:
        steps = make_steps(out, args.dry_run, args.build, Path(scratch))
        only = {s for s in args.only.split(",") if s}
        for step in steps:
            if only and step.name not in only:
                continue
            remaining = args.budget - (time.perf_counter() - t_start)
            records.append(run_step(step, log, remaining, base_env))
    total = time.perf_counter() - t_start
    bench = []
    if (out / "bench.json").exists():
        bench = json.loads((out / "bench.json").read_text()).get("rows", [])
    meta = {"started": started, "host": os.uname().nodename, "dry_run": args.dry_run,
            "total_seconds": total, "budget_seconds": args.budget, "python": PY}
    (out / "results.json").write_text(json.dumps(
        {**meta, "steps": [r.__dict__ for r in records], "bench": bench}, indent=1))
    write_markdown(out / "results.md", meta, records, bench)
    bad = [r.name for r in records if r.status != "passed"]
    print(f"== {len(records) - len(bad)}/{len(records)} steps passed in {total:.0f} s"
          + (f"; not passed: {', '.join(bad)}" if bad else "") + f"; results in {out}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
