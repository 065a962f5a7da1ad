"""RL plots: a labelled colour bar, readable raw scores, and a labelled GIF grid."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("PIL")

from matplotlib import pyplot as plt  # noqa: E402

from blip.rl import gifs, plots  # noqa: E402


def test_reward_heatmap_colour_bar_is_labelled(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    kept: list = []
    monkeypatch.setattr(plt, "close", lambda fig=None: kept.append(fig))
    raw = np.array([[2.0, np.nan], [1.0, 0.0]])
    norm = np.array([[1.0, np.nan], [0.5, np.nan]])  # raw[1, 1] = 0: no ratio
    plots.reward_heatmap(norm, raw, ["Breakout", "Freeway"], tmp_path / "r.png")
    (fig,) = kept
    ax, bar = fig.axes
    assert "score right after training" in bar.get_ylabel()
    texts = {t.get_text(): t.get_color() for t in ax.texts}
    assert texts["0"] == "black"  # on the white (no-ratio) cell it stays readable
    monkeypatch.undo()
    plt.close("all")


def test_gif_grid_labels_rows_and_columns() -> None:
    frame = np.full((10, 10, 3), 200, dtype=np.uint8)
    clips = {(0, 0): [frame], (1, 0): [frame], (1, 1): [frame]}
    (canvas,) = gifs.grid_frames(clips, 2)
    side = 2 * (gifs.CELL + gifs.PAD) + gifs.PAD
    height, width, _ = canvas.shape
    left = width - side
    assert height == gifs.LABEL_H + side and left > 40  # room for "after game i"
    background = canvas[0, 0].copy()
    for i in range(2):  # text pixels left of each row, above each column
        y0 = gifs.LABEL_H + gifs.PAD + i * (gifs.CELL + gifs.PAD)
        band = canvas[y0 : y0 + gifs.CELL, :left]
        assert (band != background).any(), f"row {i} unlabelled"
        x0 = left + gifs.PAD + i * (gifs.CELL + gifs.PAD)
        assert (canvas[: gifs.LABEL_H, x0 : x0 + gifs.CELL] != background).any()
    # the clip itself sits in its cell
    y, x = gifs.LABEL_H + gifs.PAD, left + gifs.PAD
    assert (canvas[y : y + gifs.CELL, x : x + gifs.CELL] == 200).all()
