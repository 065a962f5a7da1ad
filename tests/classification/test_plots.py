"""The classification plots show what a reader looks for (checked on the figure objects)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from matplotlib import pyplot as plt  # noqa: E402
from matplotlib.patches import StepPatch  # noqa: E402

from blip.classification import plots  # noqa: E402


@pytest.fixture
def figures(monkeypatch: pytest.MonkeyPatch) -> list:
    """The figures the plot functions close, kept for inspection."""
    kept: list = []
    monkeypatch.setattr(plt, "close", lambda fig=None: kept.append(fig))
    yield kept
    monkeypatch.undo()
    plt.close("all")


def test_acc_heatmap_scales_to_the_data_with_one_decimal(tmp_path: Path, figures: list) -> None:
    acc = np.full((3, 3), np.nan)
    acc[np.tril_indices(3)] = [0.951, 0.948, 0.962, 0.940, 0.955, 0.972]
    plots.acc_heatmap(acc, tmp_path / "acc.png")
    assert (tmp_path / "acc.png").stat().st_size > 0
    (fig,) = figures
    ax = fig.axes[0]
    lo, hi = ax.images[0].get_clim()
    assert (lo, hi) == pytest.approx((94.0, 97.2))  # not 0..100: differences visible
    texts = sorted(t.get_text() for t in ax.texts)
    assert texts == sorted(["95.1", "94.8", "96.2", "94.0", "95.5", "97.2"])
    # contrast: the darkest cell (lowest value) gets light text, the brightest dark text
    colour = {t.get_text(): t.get_color() for t in ax.texts}
    assert colour["94.0"] == "white" and colour["97.2"] == "black"
    assert fig.axes[1].get_ylabel() == "test accuracy (%)"


def test_acc_heatmap_constant_matrix_does_not_divide_by_zero(tmp_path: Path,
                                                             figures: list) -> None:
    plots.acc_heatmap(np.full((2, 2), 0.5), tmp_path / "acc.png")
    lo, hi = figures[0].axes[0].images[0].get_clim()
    assert lo < 50 < hi


def test_bits_histograms_steps_zero_bins_and_legend_outside(tmp_path: Path,
                                                            figures: list) -> None:
    hists = [{"trunk.0": [90, 10, 0, 0], "trunk.2": [5, 0, 5, 0]},
             {"trunk.0": [50, 30, 20, 0], "trunk.2": [2, 3, 0, 5]}]
    plots.bits_histograms(hists, tmp_path / "bits.png")
    (fig,) = figures
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert len(panels) == 2
    for ax in panels:
        steps = [p for p in ax.patches if isinstance(p, StepPatch)]
        assert len(steps) == 2 and not ax.lines  # one step line per task, no markers
        assert ax.get_yscale() == "symlog"
        # a zero bin is drawn at 0, which is inside the axis (a log axis drops it)
        values = np.concatenate([p.get_data().values for p in steps])
        assert (values == 0).any() and ax.get_ylim()[0] <= 0
        assert ax.get_legend() is None
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == ["after task 0", "after task 1"]
    # placed right of the panels, not over them
    assert legend.get_bbox_to_anchor().x0 >= fig.bbox.x1 - 1
