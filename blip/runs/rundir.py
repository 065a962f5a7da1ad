"""Run-directory helpers both trainers use: names, progress bars, matrix CSVs, plotting."""

from __future__ import annotations

import csv
import io
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import validate

#: where runs go when the user names no directory
RUNS_ROOT = Path("runs")


def plural(n: int, word: str, many: str | None = None) -> str:
    """``1 rollout``, ``2 rollouts`` (``many``: an irregular plural)."""
    return f"{n} {word if n == 1 else (many or word + 's')}"


def eta(seconds: float) -> str:
    """A duration for progress lines: ``42s``, ``3m05s``, ``1h02m``."""
    s = max(int(round(seconds)), 0)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def run_name(*parts: str, seed: int) -> str:
    """``part1-part2-...-seed<k>``: the directory name of one run."""
    return "-".join([*parts, f"seed{seed}"])


class Runner:
    """What both trainers do with a validated config and a run directory: the device, the
    torch thread count, progress bars only on a terminal, log lines unless quiet."""

    def __init__(self, cfg: Any, out: str | Path, quiet: bool, plots: bool,
                 progress: bool | None = None) -> None:
        cfg.validate()
        self.cfg = cfg
        self.out = Path(out)
        self.quiet = quiet
        self.plots = plots
        self.progress = (not quiet and sys.stderr.isatty()) if progress is None else progress
        self.device = torch.device(cfg.device)
        if cfg.threads is not None:
            # Small models gain nothing from intra-op threads and lose a lot when the
            # cores are shared (spinning workers): the embedded presets use 1.
            torch.set_num_threads(cfg.threads)

    def log(self, msg: str) -> None:
        if not self.quiet:
            print(msg, flush=True)


class Progress:
    """A tqdm bar when ``enabled`` (a terminal, not quiet); otherwise nothing."""

    def __init__(self, total: int, desc: str, enabled: bool, initial: int = 0,
                 unit: str = "it") -> None:
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, leave=False,
                            dynamic_ncols=True, unit=unit)

    def update(self, **postfix: Any) -> None:
        if self.bar is not None:
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def matrix_csv(matrix: np.ndarray, corner: str, columns: Sequence[Any], rows: Sequence[Any],
               fmt: str) -> str:
    """A square result matrix as CSV: header ``corner, columns...``; one line per row
    label; NaN (not seen yet) as an empty cell; values formatted with ``fmt``."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow([corner, *columns])
    for label, row in zip(rows, matrix, strict=True):
        w.writerow([label] + ["" if np.isnan(v) else format(v, fmt) for v in row])
    return buf.getvalue()


def read_results(path: Path, keys: tuple[str, ...], what: str, missing: str,
                 matrices: tuple[str, str], other: str) -> dict:
    """A run's results.json holding ``keys``, or one clear error naming the file: missing
    (FileNotFoundError ``missing``), not JSON, the other trainer's results (it has
    ``matrices[1]`` and not our ``matrices[0]``; ``other`` says what to run instead), or not
    ``what`` (a ValueError)."""
    if not path.is_file():
        raise FileNotFoundError(missing)
    try:
        r = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    ours, theirs = matrices
    if isinstance(r, dict) and theirs in r and ours not in r:
        raise ValueError(f"{path} belongs to {other}")
    return validate.require_keys(r, keys, path, what)


def pyplot():  # noqa: ANN201 - matplotlib.pyplot, imported lazily
    """matplotlib.pyplot with the Agg backend: no display needed, and the package imports
    without matplotlib (ImportError here, at plot time)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


__all__ = ["RUNS_ROOT", "Progress", "Runner", "eta", "matrix_csv", "plural", "pyplot",
           "read_results", "run_name"]
