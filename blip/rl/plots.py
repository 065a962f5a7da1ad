"""PNG plots of a continual-RL run (matplotlib with the Agg backend, imported lazily)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..runs.rundir import pyplot


def learning_curves(curves: list[list[tuple[int, float]]], games: list[str],
                    path: str | Path, window: int = 20) -> None:
    """One panel per game: raw episode return vs env steps in that game (running mean)."""
    plt = pyplot()
    n = len(games)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 2.8), squeeze=False)
    for ax, game, curve in zip(axes[0], games, curves, strict=True):
        if curve:
            steps = np.array([s for s, _ in curve])
            ret = np.array([r for _, r in curve])
            k = min(window, len(ret))
            smooth = np.convolve(ret, np.ones(k) / k, mode="valid")
            ax.plot(steps, ret, ".", ms=2, alpha=0.3, color="tab:blue")
            ax.plot(steps[k - 1:], smooth, color="tab:blue")
        else:  # short runs of long games (Freeway) end no episode
            ax.text(0.5, 0.5, "no episode finished", ha="center", va="center",
                    transform=ax.transAxes, fontsize=8, color="grey")
        ax.set_title(game, fontsize=9)
        ax.set_xlabel("env steps")
    axes[0][0].set_ylabel("episode return (raw)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def reward_heatmap(norm: np.ndarray, raw: np.ndarray, games: list[str], path: str | Path,
                   title: str = "") -> None:
    """Colour: normalised score; text: raw score. Rows: after game i; columns: game j."""
    plt = pyplot()
    n = len(games)
    fig, ax = plt.subplots(figsize=(1.6 + 0.9 * n, 1.2 + 0.7 * n))
    finite = norm[np.isfinite(norm)]
    # 0 .. 1.2 keeps "kept its score" (1) in the same colour across runs; a run that
    # scores higher than right after training stretches the scale instead of saturating
    vmax = max(1.2, float(finite.max())) if finite.size else 1.2
    im = ax.imshow(np.ma.masked_invalid(norm), vmin=0, vmax=vmax, cmap="viridis")
    cmap = im.get_cmap()
    for i in range(n):
        for j in range(n):
            if not np.isnan(raw[i, j]):
                # light text on dark cells only; a cell without a ratio (raw[j, j] = 0)
                # is left white, so its raw score is written in black
                dark = False
                if np.isfinite(norm[i, j]):
                    r, g, b, _ = cmap(min(max(norm[i, j] / vmax, 0.0), 1.0))
                    dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.5
                ax.text(j, i, f"{raw[i, j]:.3g}", ha="center", va="center", fontsize=7,
                        color="white" if dark else "black")
    ax.set_xticks(range(n), games, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(n), [f"after {g}" for g in games], fontsize=7)
    ax.set_xlabel("game played j", fontsize=8)
    ax.set_title(title or "raw score (text) after learning each game", fontsize=8)
    bar = fig.colorbar(im, ax=ax, fraction=0.046)
    bar.set_label("score / score right after training game j", fontsize=7)
    bar.ax.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def compare_final(rows: dict[str, np.ndarray], games: list[str], path: str | Path) -> None:
    """Grouped bars: each method's normalised score per game after the last game."""
    plt = pyplot()
    n = len(games)
    width = 0.8 / max(len(rows), 1)
    fig, ax = plt.subplots(figsize=(1.5 + 1.1 * n, 3.2))
    for k, (method, row) in enumerate(rows.items()):
        ax.bar(np.arange(n) + k * width, np.nan_to_num(row[:n]), width, label=method)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xticks(np.arange(n) + width * (len(rows) - 1) / 2, games, fontsize=8)
    ax.set_ylabel("score after all games / right after training")
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


__all__ = ["compare_final", "learning_curves", "reward_heatmap"]
