"""Continual-learning metrics over an accuracy matrix.

`acc[i, j]` is the test accuracy on task j after learning task i (NaN where j > i,
the task not yet seen). Accuracies are fractions in [0, 1]; reports show points.
"""

from __future__ import annotations

import math

import numpy as np

# the capacity metric is defined beside the BLIP state it measures (core may not import runs)
from ..strategy import used_capacity  # noqa: F401  (re-exported: blip.runs.metrics)


def new_matrix(n_tasks: int) -> np.ndarray:
    return np.full((n_tasks, n_tasks), np.nan)


def acc(matrix: np.ndarray, upto: int | None = None) -> float:
    """Mean accuracy over tasks 0..T-1 after learning task T-1 (the last row)."""
    T = len(matrix) if upto is None else upto + 1
    return float(np.mean(matrix[T - 1, :T]))


def bwt(matrix: np.ndarray, upto: int | None = None, authors: bool = False) -> float:
    """Backward transfer: mean over j < T-1 of acc[T-1, j] - acc[j, j].

    The usual definition divides by T-1; the authors' scripts divide by T
    (`authors=True`), which shrinks it by (T-1)/T.
    """
    T = len(matrix) if upto is None else upto + 1
    if T < 2:
        return 0.0
    diff = sum(matrix[T - 1, j] - matrix[j, j] for j in range(T - 1))
    return float(diff / (T if authors else T - 1))


def forgetting(matrix: np.ndarray, upto: int | None = None) -> list[float]:
    """Per earlier task j: best accuracy it ever had before the end minus its final one."""
    T = len(matrix) if upto is None else upto + 1
    return [float(np.max(matrix[j:T - 1, j]) - matrix[T - 1, j]) for j in range(T - 1)]


def summary(matrix: np.ndarray, upto: int | None = None) -> dict:
    f = forgetting(matrix, upto)
    return {
        "acc": acc(matrix, upto),
        "bwt": bwt(matrix, upto),
        "bwt_authors": bwt(matrix, upto, authors=True),
        "forgetting": f,
        "mean_forgetting": float(np.mean(f)) if f else 0.0,
    }


def matrix_to_list(matrix: np.ndarray) -> list[list[float | None]]:
    """JSON-friendly: NaN (task not seen yet) becomes null."""
    return [[None if math.isnan(v) else float(v) for v in row] for row in matrix]


def matrix_from_list(rows: list[list[float | None]]) -> np.ndarray:
    return np.array([[np.nan if v is None else v for v in row] for row in rows], dtype=float)


def mean_std(values: list[float]) -> tuple[float, float]:
    a = np.asarray(values, dtype=float)
    return float(a.mean()), float(a.std(ddof=0)) if len(a) > 1 else 0.0
