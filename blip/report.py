"""`blip report RUN_DIR [RUN_DIR ...]`: one run's summary, or a comparison table."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from . import metrics
from .trainer import RESULTS


def load_results(run_dir: str | Path) -> dict:
    path = Path(run_dir) / RESULTS
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a `blip train` run directory?")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e


def _pts(v: float | None, sign: bool = False) -> str:
    if v is None:
        return "-"
    return f"{100 * v:+.2f}" if sign else f"{100 * v:.2f}"


def summary_text(run_dir: str | Path, r: dict) -> str:
    m = metrics.matrix_from_list(r["acc_matrix"])
    done = r["tasks_done"]
    lines = [f"run {run_dir}: {r['benchmark']} / {r['method']} (seed {r['config']['seed']}), "
             f"{done}/{r['n_tasks']} tasks{'' if r['complete'] else ' (incomplete)'}"]
    lines.append("accuracy matrix (%), row i = after task i:")
    for i in range(done):
        lines.append(f"  {i:2d} | " + " ".join(f"{100 * v:5.1f}" for v in m[i, : i + 1]))
    lines.append(f"ACC {_pts(r['acc'])}   BWT {_pts(r['bwt'], True)} (/(T-1))   "
                 f"BWT {_pts(r['bwt_authors'], True)} (authors', /T)")
    if r.get("forgetting"):
        lines.append("forgetting per task (points): "
                     + " ".join(f"{100 * f:.1f}" for f in r["forgetting"]))
    if r["capacity"] and r["capacity"][-1]:
        cap = r["capacity"][-1]
        lines.append("used capacity: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in cap.items()))
    lines.append(f"time {r['total_seconds']:.1f}s (train "
                 f"{sum(t['train_seconds'] for t in r['tasks']):.1f}s, end_task "
                 f"{sum(r['end_task_seconds']):.1f}s)")
    return "\n".join(lines)


def comparison_table(runs: list[tuple[str, dict]]) -> str:
    """One row per run, then mean ± std per (benchmark, method) group over seeds."""
    head = f"{'run':<36} {'bench':<10} {'method':<9} {'seed':>4} {'tasks':>5} {'ACC':>7} " \
           f"{'BWT':>7} {'BWT/T':>7} {'cap%':>6} {'time s':>7}"
    rows = [head, "-" * len(head)]
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for d, r in runs:
        cap = r["capacity"][-1].get("overall") if r["capacity"] and r["capacity"][-1] else None
        rows.append(f"{str(d)[-36:]:<36} {r['benchmark']:<10} {r['method']:<9} "
                    f"{r['config']['seed']:>4} {r['tasks_done']:>5} {_pts(r['acc']):>7} "
                    f"{_pts(r['bwt'], True):>7} {_pts(r['bwt_authors'], True):>7} "
                    f"{'-' if cap is None else f'{100 * cap:.1f}':>6} "
                    f"{r['total_seconds']:>7.1f}")
        groups[(r["benchmark"], r["method"])].append(r)
    if any(len(g) > 1 for g in groups.values()):
        rows += ["", "mean ± std over runs:"]
        for (bench, meth), rs in groups.items():
            def ms(key: str, rs: list[dict] = rs) -> str:
                mu, sd = metrics.mean_std([100 * x[key] for x in rs])
                return f"{mu:+.2f} ± {sd:.2f}" if key.startswith("bwt") else f"{mu:.2f} ± {sd:.2f}"
            t = float(np.mean([x["total_seconds"] for x in rs]))
            rows.append(f"  {bench} / {meth} (n={len(rs)}): ACC {ms('acc')}, BWT {ms('bwt')}, "
                        f"BWT/T {ms('bwt_authors')}, time {t:.1f}s")
    return "\n".join(rows)


def report(run_dirs: list[str]) -> str:
    runs = [(d, load_results(d)) for d in run_dirs]
    if len(runs) == 1:
        return summary_text(*runs[0])
    return comparison_table(runs)
