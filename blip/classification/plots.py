"""PNG plots of a classification run (matplotlib through :func:`blip.runs.rundir.pyplot`:
lazily, with the Agg backend)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..runs.rundir import pyplot


def _scale(values: np.ndarray) -> tuple[float, float]:
    """Colour limits spanning the finite values (a fixed 0-100 made every cell of a run
    with 90-98% accuracies the same colour)."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return 0.0, 1.0
    lo, hi = float(finite.min()), float(finite.max())
    return (lo - 0.5, hi + 0.5) if hi - lo < 1e-9 else (lo, hi)


def acc_heatmap(matrix: np.ndarray, path: str | Path, title: str = "") -> None:
    """acc[i, j] in points: rows = after learning task i, columns = task evaluated.

    Colours span the matrix's own range; every cell is labelled with one decimal, the
    text dark on light cells and light on dark ones."""
    plt = pyplot()
    T = len(matrix)
    values = 100 * np.asarray(matrix, dtype=float)
    lo, hi = _scale(values)
    cmap = plt.get_cmap("viridis")
    fig, ax = plt.subplots(figsize=(1.6 + 0.62 * T, 1.1 + 0.55 * T))
    im = ax.imshow(np.ma.masked_invalid(values), vmin=lo, vmax=hi, cmap=cmap)
    for i in range(T):
        for j in range(T):
            if np.isfinite(values[i, j]):
                r, g, b, _ = cmap((values[i, j] - lo) / (hi - lo))
                dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.5
                ax.text(j, i, f"{values[i, j]:.1f}", ha="center", va="center",
                        fontsize=6.5 if T > 8 else 7.5, color="white" if dark else "black")
    ax.set_xlabel("evaluated task j")
    ax.set_ylabel("after learning task i")
    ax.set_xticks(range(T))
    ax.set_yticks(range(T))
    ax.set_title(title or "test accuracy (%)", fontsize=9)
    bar = fig.colorbar(im, ax=ax, fraction=0.046)
    bar.set_label("test accuracy (%)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def bits_histograms(hists: list[dict[str, list[int]]], path: str | Path) -> None:
    """One panel per layer; one step line per task: fraction of parameters with k frozen
    bits (a histogram counts 0..max_bit bits).

    The y axis is logarithmic above the smallest non-zero fraction (1 / parameters) and
    linear below it (symlog), so an empty bin sits at 0 instead of vanishing from a log
    axis; the task legend is outside the panels."""
    if not hists or not hists[0]:
        return
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

    layers = list(hists[0])
    ncols = min(len(layers), 3)
    nrows = -(-len(layers) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.4 * nrows), squeeze=False)
    cmap = plt.get_cmap("viridis")
    n_bins = len(next(iter(hists[0].values())))
    edges = np.arange(n_bins + 1) - 0.5  # bin k is centred on k frozen bits
    for ax, layer in zip(axes.flat, layers, strict=False):
        n_params = max(sum(hists[0][layer]), 1)
        for t, h in enumerate(hists):
            counts = np.asarray(h[layer], dtype=float)
            ax.stairs(counts / max(counts.sum(), 1), edges, lw=1.3, baseline=None,
                      color=cmap(t / max(len(hists) - 1, 1)), label=f"after task {t}")
        ax.set_yscale("symlog", linthresh=1.0 / n_params, linscale=0.6)
        ax.set_ylim(0, 1.3)
        ax.set_xlim(edges[0], edges[-1])
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"{layer} ({n_params:,} parameters)", fontsize=9)
        ax.set_xlabel("frozen bits")
        ax.set_ylabel("fraction of parameters")
        ax.grid(True, which="major", axis="y", lw=0.3, alpha=0.5)
    for ax in list(axes.flat)[len(layers):]:
        ax.set_visible(False)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.tight_layout()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7,
               frameon=False)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def capacity_curve(capacity: list[dict[str, float]], path: str | Path) -> None:
    """Used capacity (fraction of max_bit * params) per layer after each task."""
    if not capacity:
        return
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.4))
    t = np.arange(len(capacity))
    layers = [k for k in capacity[0] if k != "overall"]
    for layer in capacity[0]:
        if layer != "overall" and len(layers) == 1:
            continue  # one layer: its line is the overall one, drawn once below
        label = f"overall ({layers[0]})" if layer == "overall" and len(layers) == 1 else layer
        ax.plot(t, [100 * c.get(layer, np.nan) for c in capacity], marker="o", ms=3,
                lw=2.2 if layer == "overall" else 1, label=label)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # tasks, not 0.5 steps
    ax.set_xlabel("after task")
    ax.set_ylabel("used capacity (%)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
