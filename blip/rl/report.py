"""Compare finished continual-RL runs: each method's score on every game after the
last game, raw and normalised (markdown table and a bar plot)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..runs import checkpoint as ckpt
from ..runs.metrics import matrix_from_list
from ..runs.rundir import read_results

RESULT_KEYS = ("suite", "method", "games", "games_done", "complete", "reward_matrix",
               "reward_matrix_norm", "final_mean_norm")


def _load(run: str | Path) -> dict:
    path = Path(run) / "results.json"
    r = read_results(path, RESULT_KEYS, "a `blip rl` results file",
                     missing=f"no results.json in {run} (not a finished blip rl run)",
                     matrices=("reward_matrix", "acc_matrix"),
                     other=f"a `blip train` run; summarise it with `blip report {run}`")
    # results.json is rewritten after every game: a run still going (or killed) has one
    if r.get("complete") is not True:
        raise ValueError(
            f"run {run} is not finished ({r.get('games_done', '?')} of "
            f"{len(r.get('games', [])) or '?'} games done, complete={r.get('complete')}); "
            f"finish it first (blip rl ... --out {run} --resume)")
    try:  # the fields the table reads, with their shapes
        n = len(r["games"])
        if not all(isinstance(g, str) for g in r["games"]):
            raise ValueError("games must be names")
        for key in ("reward_matrix", "reward_matrix_norm"):
            if matrix_from_list(r[key]).shape != (n, n):
                raise ValueError(f"{key} is not {n} x {n}")
        if not (isinstance(r["games_done"], int) and 1 <= r["games_done"] <= n):
            raise ValueError(f"games_done {r['games_done']!r} is not in 1..{n}")
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path} is malformed ({e})") from None
    return r


def compare_runs(runs: list[str], out: str | Path | None = None, plots: bool = True) -> str:
    results = [_load(r) for r in runs]
    try:
        return _compare(runs, results, out, plots)
    except (KeyError, IndexError, TypeError, AttributeError) as e:
        raise ValueError(f"results.json of {', '.join(map(str, runs))} malformed "
                         f"({type(e).__name__}: {e})") from None


def _compare(runs: list[str], results: list[dict], out: str | Path | None, plots: bool) -> str:
    games = results[0]["games"]
    lines = ["| method | " + " | ".join(games) + " | mean norm. |",
             "|---" * (len(games) + 2) + "|"]
    rows: dict[str, np.ndarray] = {}
    for run, r in zip(runs, results, strict=True):
        if r["games"][: len(games)] != games:
            raise ValueError(f"run {run} learned games {r['games']}, not {games}")
        raw = matrix_from_list(r["reward_matrix"])
        norm = matrix_from_list(r["reward_matrix_norm"])
        last = r["games_done"] - 1
        label = r["method"] if r["method"] not in rows else f"{r['method']} ({run})"
        rows[label] = norm[last]
        cells = [("–" if np.isnan(raw[last, j]) else
                  f"{raw[last, j]:.3g} ({norm[last, j]:.2f})" if not np.isnan(norm[last, j])
                  else f"{raw[last, j]:.3g}") for j in range(len(games))]
        mean = r.get("final_mean_norm")
        lines.append(f"| {label} | " + " | ".join(cells)
                     + f" | {'–' if mean is None else f'{mean:.2f}'} |")
    diag = ["right after training (per run): "
            + ", ".join(f"{lab}: " + " ".join(f"{v:.3g}" for v in np.diag(
                matrix_from_list(r["reward_matrix"]))) for lab, r in zip(rows, results,
                                                                          strict=True))]
    table = "\n".join(lines + ["", *diag,
                               "", "cells: raw score after the last game (score / |score "
                               "right after training that game|)"])
    if out is not None:
        out = Path(out)
        ckpt.write_text_atomic(out / "compare.md", table + "\n")
        if plots:
            from .plots import compare_final

            compare_final(rows, games, out / "compare.png")
    return table


__all__ = ["compare_runs"]
