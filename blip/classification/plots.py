"""PNG plots of a classification run (matplotlib through :func:`blip.runs.rundir.pyplot`:
lazily, with the Agg backend)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..runs.rundir import pyplot


def acc_heatmap(matrix: np.ndarray, path: str | Path, title: str = "") -> None:
    """acc[i, j] in points: rows = after learning task i, columns = task evaluated."""
    plt = pyplot()
    T = len(matrix)
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * T, 0.8 + 0.5 * T))
    m = np.ma.masked_invalid(100 * matrix)
    im = ax.imshow(m, vmin=0, vmax=100, cmap="viridis")
    for i in range(T):
        for j in range(T):
            if not np.isnan(matrix[i, j]):
                ax.text(j, i, f"{100 * matrix[i, j]:.0f}", ha="center", va="center",
                        fontsize=7, color="white" if matrix[i, j] < 0.6 else "black")
    ax.set_xlabel("evaluated task j")
    ax.set_ylabel("after learning task i")
    ax.set_xticks(range(T))
    ax.set_yticks(range(T))
    ax.set_title(title or "test accuracy (%)", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def bits_histograms(hists: list[dict[str, list[int]]], path: str | Path) -> None:
    """One panel per layer; one line per task: fraction of parameters with k frozen bits
    (a histogram counts 0..max_bit bits)."""
    if not hists or not hists[0]:
        return
    plt = pyplot()
    layers = list(hists[0])
    fig, axes = plt.subplots(1, len(layers), figsize=(4.2 * len(layers), 3.2), squeeze=False)
    cmap = plt.get_cmap("viridis")
    k = np.arange(len(next(iter(hists[0].values()))))
    for ax, layer in zip(axes[0], layers, strict=True):
        for t, h in enumerate(hists):
            counts = np.asarray(h[layer], dtype=float)
            ax.plot(k, counts / max(counts.sum(), 1), marker=".", lw=1,
                    color=cmap(t / max(len(hists) - 1, 1)), label=f"task {t}")
        ax.set_title(layer, fontsize=9)
        ax.set_xlabel("frozen bits")
        ax.set_ylabel("fraction of parameters")
        ax.set_yscale("log")
    axes[0][-1].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def capacity_curve(capacity: list[dict[str, float]], path: str | Path) -> None:
    """Used capacity (fraction of max_bit * params) per layer after each task."""
    if not capacity:
        return
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.4))
    t = np.arange(len(capacity))
    for layer in capacity[0]:
        ax.plot(t, [100 * c.get(layer, np.nan) for c in capacity], marker="o", ms=3,
                lw=2.2 if layer == "overall" else 1, label=layer)
    ax.set_xlabel("after task")
    ax.set_ylabel("used capacity (%)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
