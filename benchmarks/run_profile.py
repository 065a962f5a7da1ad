"""Where a pdigits run's time goes, before and after the step-overhead work (issue 18).

    python3 benchmarks/run_profile.py [--old-tree DIR] [--reps 5] [--epochs 30]
                                      [--json benchmarks/results/<name>.json]

Three measurements, each interleaved (variants alternate inside every round) so the load
of a shared machine hits all of them alike; medians and [min-max] over the rounds:

1. phases (thread CPU time): one epoch of pdigits task 0 (81 steps of batch 16, one
   thread) split into gather, forward, zero_grad, backward, step, plus one validation
   pass and the end-of-task Fisher, for BLIP and finetune, in the old loop (a gather per
   batch, torch's zero_grad), the new eager one (chunked gather, ConstrainedSGD.zero_grad)
   and the fused one (classification/fused_step.py: its forward+backward is counted as
   "forward", its .grad writes as "backward"); the arithmetic floor is the step's
   multiply-adds over the measured 1-thread GEMM rate.
2. imports: fresh interpreters timing `import torch`, `import torch._dynamo`, `import
   sklearn.datasets`, `import blip` and `python3 -m blip --help`.
3. runs: whole `python3 -m blip train` processes of the old tree (``--old-tree``, e.g.
   ``git archive main | tar -x -C /tmp/old`` plus the built ``blip_kernels/_C*.so``) and
   this one, for blip and finetune: wall, CPU (user+sys, the work regardless of load) and
   the run's own reported total (results.json ``total_seconds``); this tree runs twice, at
   its default (the fused step) and with ``--compile eager`` (the autograd step).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("gather", "forward", "zero_grad", "backward", "step")
# Phases are timed in CPU time of this thread (one torch thread, and CPU autograd runs on
# the calling thread): a process descheduled by other jobs accrues none, so the phase split
# stays readable on a loaded machine where wall time jumps by 2-5x between rounds.
clock = time.thread_time


def _stats(xs: list[float]) -> dict[str, float]:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def gemm_macs_per_s() -> float:
    """1-thread fp32 GEMM rate (multiply-adds/s) on a 256^3 product, best of 20."""
    a, b = torch.randn(256, 256), torch.randn(256, 256)
    best = float("inf")
    for _ in range(20):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 256 ** 3 / best


def step_macs(batch: int, sizes: list[int]) -> int:
    """Forward (x W^T per layer) + backward (weight grads per layer, input grads of all
    but the first layer) multiply-adds of an MLP with layer widths ``sizes``."""
    layers = list(zip(sizes[:-1], sizes[1:], strict=True))
    fwd = sum(batch * i * o for i, o in layers)
    bwd = fwd + sum(batch * i * o for i, o in layers[1:])
    return fwd + bwd


def _eager_epoch(m: Any, net: torch.nn.Module, opt: torch.optim.Optimizer,
                 it: Iterable[tuple[torch.Tensor, torch.Tensor]], acc: dict[str, float],
                 old_zero_grad: bool) -> int:
    """One epoch of the autograd step, its phases' CPU time added into ``acc``; returns the
    steps. ``old_zero_grad``: torch's Optimizer.zero_grad (the main-branch loop's)."""
    n = 0
    t0 = clock()
    for x, y in it:
        t1 = clock()
        loss = m.training_loss(net, x, y, 0)
        t2 = clock()
        if old_zero_grad:
            torch.optim.Optimizer.zero_grad(opt, True)
        else:
            opt.zero_grad(set_to_none=True)
        t3 = clock()
        loss.backward()
        t4 = clock()
        opt.step()
        m.after_step(0)
        t5 = clock()
        for k, a, b in zip(PHASES, (t0, t1, t2, t3, t4), (t1, t2, t3, t4, t5), strict=True):
            acc[k] += b - a
        n += 1
        t0 = clock()
    return n


def _fused_epoch(fs: Any, m: Any, opt: torch.optim.Optimizer,
                 it: Iterable[tuple[torch.Tensor, torch.Tensor]], acc: dict[str, float]) -> int:
    """One epoch of FusedStep's body, split as its __call__ runs it: forward+backward (as
    "forward"), zero_grad, the .grad writes (as "backward"), the optimizer step."""
    n = 0
    t0 = clock()
    for x, y in it:
        t1 = clock()
        with torch.no_grad():
            _, grads = fs._forward_backward(x, y)
        t2 = clock()
        opt.zero_grad(set_to_none=True)
        t3 = clock()
        for p, g in grads:
            p.grad = g
        m.after_backward(0)
        t4 = clock()
        opt.step()
        m.after_step(0)
        t5 = clock()
        for k, a, b in zip(PHASES, (t0, t1, t2, t3, t4), (t1, t2, t3, t4, t5), strict=True):
            acc[k] += b - a
        n += 1
        t0 = clock()
    return n


def phases(rounds: int) -> dict:
    from blip.classification.data import load_benchmark
    from blip.classification.fused_step import FusedStep
    from blip.classification.step import batches
    from blip.classification.trainer import TrainConfig, Trainer
    from blip.methods import make_method
    from blip.models import MLP

    torch.set_num_threads(1)
    task = load_benchmark("pdigits", None, False, 0)[0]
    x_train, y_train = task.x_train, task.y_train
    evaluator = Trainer(TrainConfig(threads=1), tempfile.mkdtemp(), quiet=True)
    setups = {}
    for name in ("blip", "finetune"):
        torch.manual_seed(0)
        m = make_method(name, MLP(64, 100, [10] * 10))
        net = m.prepare()
        setups[name] = (m, net, m.make_optimizer(0, 0.1))
    times: dict[str, dict[str, list[float]]] = {}
    for r in range(rounds + 1):  # round 0 warms up and is dropped
        perm = torch.randperm(len(y_train), generator=torch.Generator().manual_seed(r))
        for name, (m, net, opt) in setups.items():
            for loop in ("old", "new", "fused"):
                acc = dict.fromkeys(PHASES, 0.0)
                net.train()
                if loop == "fused":
                    n = _fused_epoch(FusedStep(m, net, opt, 0), m, opt,
                                     batches(task, x_train, y_train, perm, 16), acc)
                elif loop == "old":  # the main-branch loop: a gather per batch, torch's zero_grad
                    it = ((task.inputs(x_train[perm[i:i + 16]]), y_train[perm[i:i + 16]])
                          for i in range(0, len(perm), 16))
                    n = _eager_epoch(m, net, opt, it, acc, old_zero_grad=True)
                else:
                    n = _eager_epoch(m, net, opt, batches(task, x_train, y_train, perm, 16),
                                     acc, old_zero_grad=False)
                if r == 0:
                    continue
                key = f"{name}/{loop}"
                d = times.setdefault(key, {k: [] for k in (*PHASES, "total", "eval", "fisher")})
                for k in PHASES:
                    d[k].append(acc[k] / n)
                d["total"].append(sum(acc.values()) / n)
                t = clock()
                evaluator.evaluate(net, task, 0, "valid", method=m)
                d["eval"].append(clock() - t)
        for name, (m, _, _) in setups.items():  # the end of task 0 (BLIP: Fisher, bits)
            if r == 0:
                continue
            mc = copy.deepcopy(m)  # on a copy: the phases keep training task 0
            t = clock()
            mc.after_task(0, task.inputs(x_train), y_train)
            for loop in ("old", "new", "fused"):
                times[f"{name}/{loop}"]["fisher"].append(clock() - t)
    macs = step_macs(16, [64, 100, 10])
    rate = gemm_macs_per_s()
    return {"per_step_s": {k: {p: _stats(v) for p, v in d.items()} for k, d in times.items()},
            "steps_per_epoch": (len(y_train) + 15) // 16, "step_macs": macs,
            "gemm_macs_per_s": rate, "floor_per_step_s": macs / rate,
            "floor_run_s": macs / rate * 24300}


def _timed(cmd: list[str], env: dict, cwd: Path) -> tuple[float, float]:
    """(wall, user+sys CPU) of a child process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    subprocess.run(cmd, env=env, cwd=cwd, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def imports(reps: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    py = sys.executable
    cases = {
        "python": [py, "-c", "pass"],
        "import torch": [py, "-c", "import torch"],
        "import torch + torch._dynamo": [py, "-c", "import torch, torch._dynamo"],
        "import torch + sklearn.datasets": [py, "-c", "import torch, sklearn.datasets"],
        "import blip": [py, "-c", "import blip"],
        "blip --help": [py, "-m", "blip", "--help"],
    }
    out: dict[str, dict[str, list[float]]] = {k: {"wall": [], "cpu": []} for k in cases}
    for _ in range(reps):
        for k, cmd in cases.items():
            wall, cpu = _timed(cmd, env, ROOT)
            out[k]["wall"].append(wall)
            out[k]["cpu"].append(cpu)
    return {k: {m: _stats(v) for m, v in d.items()} for k, d in out.items()}


def runs(old_tree: Path | None, reps: int, epochs: int) -> dict:
    # variant -> (tree, extra arguments): this tree at its default (the fused step) and
    # with the autograd step, which the old tree always ran
    trees = {"new": (ROOT, []), "new-eager": (ROOT, ["--compile", "eager"])}
    if old_tree is not None:
        trees = {"old": (old_tree, []), **trees}
    out: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(reps):
            for method in ("blip", "finetune"):
                for tree_name, (tree, extra) in trees.items():
                    run_dir = Path(tmp) / f"{tree_name}-{method}-{rep}"
                    env = {**os.environ, "PYTHONPATH": str(tree)}
                    cmd = [sys.executable, "-m", "blip", "train", "--method", method,
                           "--epochs", str(epochs), "--no-plots", "--quiet",
                           "--out", str(run_dir), *extra]
                    wall, cpu = _timed(cmd, env, tree)
                    res = json.loads((run_dir / "results.json").read_text())
                    d = out.setdefault(f"{method}/{tree_name}", {
                        "wall": [], "cpu": [], "reported_total": [], "acc": []})
                    d["wall"].append(wall)
                    d["cpu"].append(cpu)
                    d["reported_total"].append(res["total_seconds"])
                    d["acc"].append(res["acc"])
                    print(f"  run {rep} {method}/{tree_name}: wall {wall:.1f}s cpu {cpu:.1f}s "
                          f"reported {res['total_seconds']:.1f}s", flush=True)
    stats: dict = {k: {m: _stats(v) for m, v in d.items() if m != "acc"}
                   for k, d in out.items()}
    for k, d in out.items():
        stats[k]["acc"] = d["acc"][0]
        stats[k]["acc_same_every_rep"] = all(a == d["acc"][0] for a in d["acc"])
    # per-rep ratios of interleaved pairs (each pair ran back to back, under the same load)
    for method in ("blip", "finetune"):
        for base, other in (("old", "new"), ("new-eager", "new"), ("old", "new-eager")):
            b, o = out.get(f"{method}/{base}"), out.get(f"{method}/{other}")
            if b is None or o is None:
                continue
            stats[f"{method}: {base} / {other}"] = {
                m: _stats([x / y for x, y in zip(b[m], o[m], strict=True)])
                for m in ("wall", "cpu")}
    return stats


def _fmt(s: dict, scale: float = 1.0, unit: str = "") -> str:
    return (f"{s['median'] * scale:.3g}{unit} [{s['min'] * scale:.3g}-"
            f"{s['max'] * scale:.3g}]")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--old-tree", type=Path, help="a checkout of the code before the change")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=15, help="epochs per phase variant")
    ap.add_argument("--epochs", type=int, default=30, help="epochs per task of a whole run")
    ap.add_argument("--skip-runs", action="store_true")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    result = {"threads": 1, "torch": torch.__version__, "cpu_count": os.cpu_count(),
              "loadavg_start": os.getloadavg()}
    print("phases (one epoch of task 0, per step; median [min-max] over rounds)")
    result["phases"] = ph = phases(a.rounds)
    for key, d in ph["per_step_s"].items():
        cells = "  ".join(f"{p} {_fmt(d[p], 1e6)}" for p in (*PHASES, "total"))
        print(f"  {key:16} {cells} us; eval {_fmt(d['eval'], 1e3)} ms; "
              f"fisher {_fmt(d['fisher'], 1e3)} ms")
    print(f"  arithmetic floor: {ph['step_macs']} MACs/step at "
          f"{ph['gemm_macs_per_s'] / 1e9:.1f} GMAC/s = {ph['floor_per_step_s'] * 1e6:.2f} us/step, "
          f"{ph['floor_run_s']:.2f} s for 24300 steps")
    steps = ph["per_step_s"]
    for loop in ("new", "fused"):
        b = steps[f"blip/{loop}"]["total"]["median"]
        f = steps[f"finetune/{loop}"]["total"]["median"]
        print(f"  {loop}: blip's step / finetune's = {b / f:.3f}")
    print("imports (fresh interpreter)")
    result["imports"] = im = imports(a.reps)
    for k, d in im.items():
        print(f"  {k:34} wall {_fmt(d['wall'], 1, 's')}  cpu {_fmt(d['cpu'], 1, 's')}")
    if not a.skip_runs:
        print(f"whole runs ({a.epochs} epochs per task)")
        result["runs"] = rs = runs(a.old_tree, a.reps, a.epochs)
        for k, d in rs.items():
            if "reported_total" in d:
                print(f"  {k:18} wall {_fmt(d['wall'], 1, 's')}  cpu {_fmt(d['cpu'], 1, 's')}  "
                      f"reported {_fmt(d['reported_total'], 1, 's')}  ACC {d['acc']:.4f}"
                      f"{'' if d['acc_same_every_rep'] else ' (differs between reps!)'}")
            else:
                print(f"  {k:28} wall {_fmt(d['wall'], 1, 'x')}  cpu {_fmt(d['cpu'], 1, 'x')}")
    result["loadavg_end"] = os.getloadavg()
    if a.json:
        a.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
