"""`blip compare`: run (or reuse) several methods over seeds and tabulate them.

Each (method, seed) is an ordinary `blip train` run directory under ``OUT``, so a
compare run can be interrupted and started again: finished runs with the same
settings are reused, unfinished ones resume from their checkpoint.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .. import validate
from ..methods import METHODS
from ..runs import metrics
from ..runs.checkpoint import write_text_atomic
from ..runs.rundir import pyplot, run_name
from .report import load_results
from .trainer import RESULTS, TrainConfig, preflight, train

#: settings that must match for a finished run to be reused: all that shape its results
_SAME = TrainConfig.RESULT_KEYS


def run_dir(out: Path, benchmark: str, method: str, seed: int) -> Path:
    return out / run_name(benchmark, method, seed=seed)


def _same_settings(d: Path, cfg: TrainConfig) -> bool | None:
    """Whether the run in ``d`` used cfg's settings; None if ``d`` holds no run."""
    if not (d / RESULTS).is_file():
        return None
    have, want = TrainConfig.upgrade(load_results(d)["config"]), cfg.to_dict()
    return all(have.get(k) == want.get(k) for k in _SAME)


def run_all(benchmark: str, methods: Sequence[str], seeds: Sequence[int], out: str | Path,
            quiet: bool = True, log: Any = print, hparams: dict[str, dict] | None = None,
            **overrides: Any) -> dict[str, list[dict]]:
    """Results of every (method, seed), running the missing ones; grouped by method.
    ``hparams[method]`` holds that method's hyper-parameters (default: its defaults)."""
    out = Path(out)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:  # before any run starts
        raise ValueError(f"unknown methods {unknown}; choose from {sorted(METHODS)}")
    for what, items in (("methods", methods), ("seeds", seeds)):
        twice = sorted({str(x) for x in items if list(items).count(x) > 1})
        if twice:  # a repeated seed would be one run counted twice in the mean ± std
            raise ValueError(f"{what} must not repeat; {', '.join(twice)} listed twice")
    validate.writable_dir(out, "out directory")
    cfgs = {(method, seed): TrainConfig.from_preset(
                benchmark, method=method, seed=seed,
                method_kwargs=dict((hparams or {}).get(method, {})), **overrides)
            for method in methods for seed in seeds}
    for cfg in cfgs.values():  # every run's settings checked before the first one trains
        preflight(cfg)
    grouped: dict[str, list[dict]] = {}
    for method in methods:
        for seed in seeds:
            cfg = cfgs[(method, seed)]
            d = run_dir(out, benchmark, method, seed)
            same = _same_settings(d, cfg)
            if same and load_results(d).get("complete"):
                log(f"reusing {d}")
            else:
                # an unfinished run with the same settings resumes; other settings restart
                log(f"{'resuming' if same else 'running'} {d}")
                train(cfg, d, resume=bool(same), quiet=quiet, plots=False)
            grouped.setdefault(method, []).append(load_results(d))
    return grouped


def _ms(values: list[float], scale: float = 100.0, sign: bool = False) -> str:
    mu, sd = metrics.mean_std([scale * v for v in values])
    return f"{mu:+.2f} ± {sd:.2f}" if sign else f"{mu:.2f} ± {sd:.2f}"


def table_rows(grouped: dict[str, list[dict]]) -> list[dict[str, str]]:
    rows = []
    for method, rs in grouped.items():
        forgetting = [float(np.mean(r["forgetting"])) if r["forgetting"] else 0.0 for r in rs]
        extra = [r["tasks"][-1].get("extra_bytes_per_param", float("nan")) for r in rs]
        train_s = [sum(t["train_seconds"] for t in r["tasks"]) for r in rs]
        rows.append({
            "method": method,
            "seeds": str(len(rs)),
            "ACC %": _ms([r["acc"] for r in rs]),
            "BWT (÷T−1)": _ms([r["bwt"] for r in rs], sign=True),
            "BWT (÷T)": _ms([r["bwt_authors"] for r in rs], sign=True),
            "forgetting": _ms(forgetting),
            "extra bytes/param": f"{np.mean(extra):.2f}",
            "train s": _ms(train_s, scale=1.0),
        })
    return rows


def markdown(rows: list[dict[str, str]]) -> str:
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(r[c] for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def plot_accuracy_over_time(grouped: dict[str, list[dict]], path: Path, title: str) -> None:
    """One panel per task j: mean accuracy on j after learning each task i >= j."""
    plt = pyplot()
    T = min(r["tasks_done"] for rs in grouped.values() for r in rs)
    cols = min(T, 5)
    rows = (T + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols + 1.6, 2.4 * rows), squeeze=False,
                             sharey=True)
    # one colour and marker per method: the default cycle repeats after 10 methods
    colors = plt.get_cmap("tab20")(np.linspace(0, 1, 20))[::2].tolist() + \
        plt.get_cmap("tab20")(np.linspace(0, 1, 20))[1::2].tolist()
    markers = "o^sDv<>phx*+"
    style = {m: (colors[k % len(colors)], markers[k % len(markers)])
             for k, m in enumerate(grouped)}
    for j in range(rows * cols):
        ax = axes[j // cols][j % cols]
        if j >= T:
            ax.axis("off")
            continue
        for method, rs in grouped.items():
            acc = np.mean([metrics.matrix_from_list(r["acc_matrix"])[:T, j] for r in rs], axis=0)
            color, marker = style[method]
            ax.plot(range(j, T), 100 * acc[j:], color=color, marker=marker, ms=3, lw=1,
                    label=method)
        ax.set_title(f"task {j}", fontsize=9)
        ax.set_xlim(-0.5, T - 0.5)
        ax.set_xticks(range(T))
        ax.set_xlabel("after learning task", fontsize=8)
    axes[0][0].set_ylabel("test accuracy (%)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=7)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1 - 1.5 / (3.0 * cols + 1.6), 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def compare(benchmark: str, methods: Sequence[str], seeds: Sequence[int], out: str | Path,
            quiet: bool = True, plots: bool = True, log: Any = print,
            hparams: dict[str, dict] | None = None, **overrides: Any) -> str:
    """Run or reuse every (method, seed); write compare.md, compare.csv and the plot."""
    if not methods:
        raise ValueError("methods must name at least one method")
    if not seeds:
        raise ValueError("seeds must name at least one seed")
    out = Path(out)
    grouped = run_all(benchmark, methods, seeds, out, quiet=quiet, log=log, hparams=hparams,
                      **overrides)
    rows = table_rows(grouped)
    md = f"### {benchmark}: {', '.join(methods)} over seeds {', '.join(map(str, seeds))}\n\n"
    md += markdown(rows) + "\n"
    write_text_atomic(out / "compare.md", md)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(out / "compare.csv", buf.getvalue())
    if plots:
        plot_accuracy_over_time(grouped, out / "compare_accuracy.png", benchmark)
    return md
