"""`blip compare`: run (or reuse) several methods over seeds and tabulate them.

Each (method, seed) is an ordinary `blip train` run directory under ``OUT``, so a
compare run can be interrupted and started again: finished runs with the same
settings are reused, unfinished ones resume from their checkpoint. Finished runs with the
same settings elsewhere are reused too: in the directories named with ``--reuse`` (a run
directory, or a folder of them) and under ``runs/``, where `blip train` writes by default.
"""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .. import validate
from ..methods import method_names
from ..runs import metrics
from ..runs.checkpoint import write_text_atomic
from ..runs.rundir import RUNS_ROOT, Progress, eta, pyplot, run_name
from .report import load_results
from .trainer import RESULTS, TrainConfig, check_same_hparams, preflight, train

#: settings that must match for a finished run to be reused: all that shape its results
_SAME = TrainConfig.RESULT_KEYS


def run_dir(out: Path, benchmark: str, method: str, seed: int) -> Path:
    return out / run_name(benchmark, method, seed=seed)


def _same_settings(d: Path, cfg: TrainConfig) -> bool | None:
    """Whether the run in ``d`` used cfg's settings; None if ``d`` holds no run."""
    if not (d / RESULTS).is_file():
        return None
    results = load_results(d)
    have, want = TrainConfig.upgrade(results["config"]), cfg.to_dict()
    if not all(have.get(k) == want.get(k) for k in _SAME):
        return False
    try:  # the method's resolved hyper-parameters too: its defaults may have changed since
        check_same_hparams(results.get("method_hparams"), cfg, d)
    except ValueError:
        return False
    return True


def candidate_runs(dirs: Sequence[str | Path]) -> list[Path]:
    """Run directories in ``dirs``: each one that holds a results.json, else its
    sub-directories that do (a folder of runs, such as ``runs/``). Missing dirs: none."""
    found: list[Path] = []
    for d in map(Path, dirs):
        if (d / RESULTS).is_file():
            found.append(d)
        elif d.is_dir():
            found += sorted(c for c in d.iterdir() if (c / RESULTS).is_file())
    return found


def _finished_match(cands: Sequence[Path], cfg: TrainConfig) -> Path | None:
    """The first finished run among ``cands`` with cfg's settings. Another trainer's run or
    an unreadable results.json is not a match (it is not ours to judge here)."""
    for d in cands:
        try:
            if _same_settings(d, cfg) and load_results(d).get("complete"):
                return d
        except (ValueError, OSError, KeyError, TypeError):
            continue
    return None


class _Progress:
    """Per-task progress lines of a compare (run k/N, method, seed, task t/T, ETA) and an
    overall bar of runs (on a terminal). A trainer hook: on_start / on_task."""

    def __init__(self, n_runs: int, to_train: int, log: Any, bar: bool) -> None:
        self.n_runs, self.to_train, self.log = n_runs, to_train, log
        self.bar = Progress(n_runs, "compare", bar, unit="run")
        self.trained_tasks, self.train_seconds = 0, 0.0
        self.label, self.T, self.t0 = "", 0, 0.0

    def start_run(self, label: str) -> None:
        self.label = label
        self.to_train -= 1

    def on_start(self, T: int, first: int) -> None:
        self.T, self.t0 = T, time.perf_counter()

    def on_task(self, t: int, *_: Any) -> None:
        now = time.perf_counter()
        self.train_seconds += now - self.t0
        self.trained_tasks += 1
        self.t0 = now
        per_task = self.train_seconds / self.trained_tasks
        left = (self.T - t - 1) + self.to_train * self.T  # runs not started: T tasks each
        self.log(f"{self.label}: task {t + 1}/{self.T}, ETA {eta(per_task * left)}")

    def run_done(self) -> None:
        self.bar.update()

    def finish(self) -> None:  # not ``close``: the trainer calls its hooks' close per run
        self.bar.close()


def run_all(benchmark: str, methods: Sequence[str], seeds: Sequence[int], out: str | Path,
            quiet: bool = True, log: Any = print, hparams: dict[str, dict] | None = None,
            reuse: Sequence[str | Path] = (), search: Sequence[str | Path] = (RUNS_ROOT,),
            hooks: Any = None, progress: bool = False, **overrides: Any
            ) -> dict[str, list[dict]]:
    """Results of every (method, seed), running the missing ones; grouped by method.
    ``hparams[method]`` holds that method's hyper-parameters (default: its defaults).
    A finished run with the same settings is reused from ``out``, then from ``reuse``,
    then from ``search`` (default ``runs/``). ``hooks(run_dir)`` gives extra trainer hooks
    for a run that trains (e.g. TensorBoard); ``progress``: an overall bar."""
    out = Path(out)
    unknown = [m for m in methods if m not in method_names()]
    if unknown:  # before any run starts
        raise ValueError(f"unknown methods {unknown}; choose from {method_names()}")
    for what, items in (("methods", methods), ("seeds", seeds)):
        twice = sorted({str(x) for x in items if list(items).count(x) > 1})
        if twice:  # a repeated seed would be one run counted twice in the mean ± std
            raise ValueError(f"{what} must not repeat; {', '.join(twice)} listed twice")
    missing = [str(d) for d in reuse if not Path(d).exists()]
    if missing:
        raise ValueError(f"reuse: no such directory {', '.join(missing)}")
    validate.writable_dir(out, "out directory")
    cfgs = {(method, seed): TrainConfig.from_preset(
                benchmark, method=method, seed=seed,
                method_kwargs=dict((hparams or {}).get(method, {})), **overrides)
            for method in methods for seed in seeds}
    for cfg in cfgs.values():  # every run's settings checked before the first one trains
        preflight(cfg)
    elsewhere = candidate_runs([*reuse, *search])
    plan: dict[tuple[str, int], tuple[Path, bool | None, Path | None]] = {}
    for (method, seed), cfg in cfgs.items():
        d = run_dir(out, benchmark, method, seed)
        same = _same_settings(d, cfg)
        found = d if same and load_results(d).get("complete") else _finished_match(elsewhere,
                                                                                     cfg)
        plan[(method, seed)] = (d, same, found)
    n = len(plan)
    prog = _Progress(n, sum(f is None for _, _, f in plan.values()), log, progress)
    grouped: dict[str, list[dict]] = {}
    try:
        for k, ((method, seed), (d, same, found)) in enumerate(plan.items(), 1):
            label = f"[{k}/{n}] {method} seed {seed}"
            if found is not None:
                log(f"{label}: reusing {found}")
            else:
                # an unfinished run with the same settings resumes; other settings restart
                log(f"{label}: {'resuming' if same else 'running'} {d}")
                prog.start_run(label)
                extra = hooks(d) if hooks is not None else []
                train(cfgs[(method, seed)], d, resume=bool(same), quiet=quiet, plots=False,
                      hooks=[prog, *extra])
                found = d
            grouped.setdefault(method, []).append(load_results(found))
            prog.run_done()
    finally:
        prog.finish()
    return grouped


def _ms(values: list[float], scale: float = 100.0, sign: bool = False) -> str:
    """``mean ± std`` over seeds; the mean alone with one seed (no spread to show)."""
    mu, sd = metrics.mean_std([scale * v for v in values])
    m = f"{mu:+.2f}" if sign else f"{mu:.2f}"
    return f"{m} ± {sd:.2f}" if len(values) >= 2 else m


# (column stem, scale, signed, the values of one method's runs)
def _measures(rs: list[dict]) -> list[tuple[str, float, bool, list[float]]]:
    forgetting = [float(np.mean(r["forgetting"])) if r["forgetting"] else 0.0 for r in rs]
    return [
        ("acc", 100.0, False, [r["acc"] for r in rs]),
        ("bwt", 100.0, True, [r["bwt"] for r in rs]),
        ("bwt_authors", 100.0, True, [r["bwt_authors"] for r in rs]),
        ("forgetting", 100.0, False, forgetting),
        ("train_s", 1.0, False, [sum(t["train_seconds"] for t in r["tasks"]) for r in rs]),
    ]


def _extra_bytes(rs: list[dict]) -> float:
    return float(np.mean([r["tasks"][-1].get("extra_bytes_per_param", float("nan"))
                          for r in rs]))


def _capacity(rs: list[dict]) -> list[float] | None:
    """Each run's used capacity after its last task (BLIP and its variants); None for a
    method that keeps no bits."""
    caps = [r["capacity"][-1].get("overall") if r.get("capacity") else None for r in rs]
    return None if any(c is None for c in caps) else caps


def table_rows(grouped: dict[str, list[dict]]) -> list[dict[str, str]]:
    """The markdown table's rows (formatted strings)."""
    heads = {"acc": "ACC %", "bwt": "BWT (÷T−1)", "bwt_authors": "BWT (÷T)",
             "forgetting": "forgetting", "train_s": "train s"}
    rows = []
    for method, rs in grouped.items():
        row = {"method": method, "seeds": str(len(rs))}
        for stem, scale, sign, values in _measures(rs):
            row[heads[stem]] = _ms(values, scale, sign)
            if stem == "forgetting":
                row["extra bytes/param"] = f"{_extra_bytes(rs):.2f}"
                caps = _capacity(rs)
                row["capacity %"] = "–" if caps is None else _ms(caps)
        rows.append(row)
    return rows


def csv_rows(grouped: dict[str, list[dict]]) -> list[dict[str, Any]]:
    """compare.csv's rows: numbers only, mean and std in separate columns (percent for
    acc/bwt/forgetting, seconds for train_s); std is empty with one seed."""
    rows = []
    for method, rs in grouped.items():
        row: dict[str, Any] = {"method": method, "seeds": len(rs)}
        for stem, scale, _, values in _measures(rs):
            mu, sd = metrics.mean_std([scale * v for v in values])
            row[f"{stem}_mean"] = round(mu, 6)
            row[f"{stem}_std"] = round(sd, 6) if len(values) >= 2 else ""
        row["extra_bytes_per_param"] = round(_extra_bytes(rs), 6)
        caps = _capacity(rs)
        mu, sd = metrics.mean_std([100 * c for c in caps]) if caps else (None, None)
        row["capacity_mean"] = "" if caps is None else round(mu, 6)
        row["capacity_std"] = "" if caps is None or len(caps) < 2 else round(sd, 6)
        rows.append(row)
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
            hparams: dict[str, dict] | None = None, reuse: Sequence[str | Path] = (),
            search: Sequence[str | Path] = (RUNS_ROOT,), hooks: Any = None,
            progress: bool = False, **overrides: Any) -> str:
    """Run or reuse every (method, seed); write compare.md, compare.csv and the plot
    (skipped with a warning when matplotlib is missing). See :func:`run_all`."""
    if not methods:
        raise ValueError("methods must name at least one method")
    if not seeds:
        raise ValueError("seeds must name at least one seed")
    out = Path(out)
    grouped = run_all(benchmark, methods, seeds, out, quiet=quiet, log=log, hparams=hparams,
                      reuse=reuse, search=search, hooks=hooks, progress=progress, **overrides)
    rows = table_rows(grouped)
    md = f"### {benchmark}: {', '.join(methods)} over seeds {', '.join(map(str, seeds))}\n\n"
    md += markdown(rows) + "\n"
    write_text_atomic(out / "compare.md", md)
    numeric = csv_rows(grouped)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(numeric[0]))
    writer.writeheader()
    writer.writerows(numeric)
    write_text_atomic(out / "compare.csv", buf.getvalue())
    if plots:
        try:
            plot_accuracy_over_time(grouped, out / "compare_accuracy.png", benchmark)
        except ImportError as e:  # matplotlib is an optional extra: the tables are written
            log(f"warning: plots skipped ({e}); pip install matplotlib")
    return md
