"""`blip report RUN_DIR [RUN_DIR ...]`: one run's summary, or a comparison table."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from ..runs import metrics
from ..runs.rundir import read_results
from .trainer import RESULTS, TrainConfig

#: what report and compare read from a `blip train` results.json
RESULT_KEYS = ("benchmark", "method", "n_tasks", "tasks_done", "complete", "acc_matrix", "acc",
               "bwt", "bwt_authors", "capacity", "total_seconds", "tasks", "end_task_seconds",
               "config")


def load_results(run_dir: str | Path) -> dict:
    """A `blip train` run's results.json; a ValueError naming the file if it is not one."""
    path = Path(run_dir) / RESULTS
    return read_results(
        path, RESULT_KEYS, "a `blip train` results file",
        missing=f"{path} not found: is {run_dir} a `blip train` run directory?",
        matrices=("acc_matrix", "reward_matrix"),
        other=f"a `blip rl` run; compare RL runs with `blip rl --compare {run_dir} ...`")


def _malformed(run_dir: str | Path, e: Exception) -> ValueError:
    return ValueError(f"{Path(run_dir) / RESULTS} is malformed ({type(e).__name__}: {e})")


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


#: config entries that may differ between seeds of one group (they do not change results)
_NOT_SETTINGS = ("seed", "device", "threads", "data_dir", "download", "trust_pickles")


def _settings_key(r: dict) -> str:
    cfg = {k: v for k, v in TrainConfig.upgrade(r["config"]).items() if k not in _NOT_SETTINGS}
    return json.dumps(cfg, sort_keys=True, default=str)


def comparison_table(runs: list[tuple[str, dict]]) -> str:
    """One row per run, then mean ± std over seeds per group of complete runs with the
    same settings (runs that differ in anything but the seed are never averaged)."""
    head = f"{'run':<36} {'bench':<10} {'method':<9} {'seed':>4} {'tasks':>5} {'ACC':>7} " \
           f"{'BWT':>7} {'BWT/T':>7} {'cap%':>6} {'time s':>7}"
    rows = [head, "-" * len(head)]
    groups: dict[tuple[str, str, str], list[tuple[str, dict]]] = defaultdict(list)
    for d, r in runs:
        cap = r["capacity"][-1].get("overall") if r["capacity"] and r["capacity"][-1] else None
        done = f"{r['tasks_done']}" + ("" if r["complete"] else "*")
        rows.append(f"{str(d)[-36:]:<36} {r['benchmark']:<10} {r['method']:<9} "
                    f"{r['config']['seed']:>4} {done:>5} {_pts(r['acc']):>7} "
                    f"{_pts(r['bwt'], True):>7} {_pts(r['bwt_authors'], True):>7} "
                    f"{'-' if cap is None else f'{100 * cap:.1f}':>6} "
                    f"{r['total_seconds']:>7.1f}")
        if r["complete"]:
            groups[(r["benchmark"], r["method"], _settings_key(r))].append((str(d), r))
    if any(not r["complete"] for _, r in runs):
        rows.append("* incomplete run: not averaged")
    if any(len(g) > 1 for g in groups.values()):
        rows += ["", "mean ± std over seeds (complete runs with the same settings):"]
        per_method = defaultdict(int)
        for bench, meth, _ in groups:
            per_method[(bench, meth)] += 1
        for (bench, meth, _), members in groups.items():
            rs = [r for _, r in members]

            def ms(key: str, rs: list[dict] = rs) -> str:
                mu, sd = metrics.mean_std([100 * x[key] for x in rs])
                return f"{mu:+.2f} ± {sd:.2f}" if key.startswith("bwt") else f"{mu:.2f} ± {sd:.2f}"
            t = float(np.mean([x["total_seconds"] for x in rs]))
            label = f"{bench} / {meth}"
            if per_method[(bench, meth)] > 1:  # several settings: name one run of each
                label += f" [as {members[0][0]}]"
            rows.append(f"  {label} (n={len(rs)}): ACC {ms('acc')}, BWT {ms('bwt')}, "
                        f"BWT/T {ms('bwt_authors')}, time {t:.1f}s")
    return "\n".join(rows)


def report(run_dirs: list[str]) -> str:
    runs = [(d, load_results(d)) for d in run_dirs]
    texts = []
    for d, r in runs:  # each run rendered alone first, so a bad file is named
        try:
            texts.append(summary_text(d, r))
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
            raise _malformed(d, e) from None
    if len(runs) == 1:
        return texts[0]
    try:
        return comparison_table(runs)
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"results of {', '.join(map(str, run_dirs))} are malformed "
                         f"({type(e).__name__}: {e})") from None
