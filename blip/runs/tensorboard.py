"""TensorBoard logging for both trainers (``--tensorboard``): the one place that knows the
tags. The trainers call a few hooks on an optional hook object; this module turns them into
``torch.utils.tensorboard.SummaryWriter`` events under ``<run dir>/tensorboard``.

Tags (step = the x-axis):
- classification: ``epoch/valid_loss``, ``epoch/valid_acc``, ``epoch/lr`` (step: epochs of
  the whole run); ``acc/task<j>`` and ``acc/mean`` (the accuracy-matrix row after task i,
  step i); ``capacity/<layer>`` (step i); ``bits/<layer>`` histograms of frozen-bit counts
  (step i).
- rl: ``update/return``, ``update/loss`` (step: updates of the whole run);
  ``reward/game<j>`` (the reward-matrix row after game i, step i); for a method with bits
  (BLIP) ``capacity/<layer>`` and ``bits/<layer>`` after game i.

TensorBoard is an optional extra: :func:`require` fails with the install command before a
run starts, not after hours of training.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

INSTALL = "pip install tensorboard"
SUBDIR = "tensorboard"


class MissingTensorBoardError(ValueError):
    """tensorboard is not installed. A ValueError so the CLI reports it as one line."""


def require() -> None:
    """Raise :class:`MissingTensorBoardError` naming the install command when
    ``torch.utils.tensorboard`` cannot be imported (it needs the tensorboard package)."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError as e:
        raise MissingTensorBoardError(
            f"--tensorboard needs the tensorboard package ({e}): {INSTALL} "
            f"(or pip install -e \".[tensorboard]\")") from None


class TensorBoardLog:
    """The hooks the trainers call; events go to ``run_dir/tensorboard``. The writer is
    opened lazily at the first event, so a run that fails its checks leaves no files."""

    def __init__(self, run_dir: str | Path) -> None:
        require()
        self.dir = Path(run_dir) / SUBDIR
        self._writer: Any = None
        self._epoch = 0  # epochs over the whole run: one continuous x-axis

    @property
    def writer(self) -> Any:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.dir))
        return self._writer

    # -- classification ---------------------------------------------------------------

    def on_epoch(self, task: int, valid_loss: float, valid_acc: float, lr: float) -> None:
        w = self.writer
        w.add_scalar("epoch/valid_loss", valid_loss, self._epoch)
        w.add_scalar("epoch/valid_acc", valid_acc, self._epoch)
        w.add_scalar("epoch/lr", lr, self._epoch)
        w.add_scalar("epoch/task", task, self._epoch)
        self._epoch += 1

    def on_task(self, task: int, acc_row: Sequence[float], capacity: Mapping[str, float],
                bits_hist: Mapping[str, Sequence[int]]) -> None:
        w = self.writer
        for j, a in enumerate(acc_row):
            w.add_scalar(f"acc/task{j}", float(a), task)
        w.add_scalar("acc/mean", float(sum(acc_row)) / max(len(acc_row), 1), task)
        for layer, c in capacity.items():
            w.add_scalar(f"capacity/{layer}", float(c), task)
        for layer, counts in bits_hist.items():
            _bits_histogram(w, f"bits/{layer}", counts, task)
        w.flush()

    # -- rl ---------------------------------------------------------------------------

    def on_update(self, update: int, ret: float | None, loss: float) -> None:
        if ret is not None and math.isfinite(ret):
            self.writer.add_scalar("update/return", ret, update)
        self.writer.add_scalar("update/loss", loss, update)

    def on_game(self, game: int, reward_row: Sequence[float], capacity: Mapping[str, Any],
                model: Any) -> None:
        """``capacity``: the method's end-of-game ``{"overall": c, "layers": {...}}`` (empty
        for a method without bits); then the bits of ``model``'s quantized layers too."""
        w = self.writer
        for j, r in enumerate(reward_row):
            w.add_scalar(f"reward/game{j}", float(r), game)
        if capacity:
            flat = {"overall": capacity.get("overall"), **capacity.get("layers", {})}
            for layer, c in flat.items():
                if c is not None:
                    w.add_scalar(f"capacity/{layer}", float(c), game)
            for layer, counts in model_bits_histograms(model).items():
                _bits_histogram(w, f"bits/{layer}", counts, game)
        w.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def model_bits_histograms(model: Any) -> dict[str, list[int]]:
    """Per quantized layer of ``model``, counts of elements with 0..max_bit frozen bits."""
    import torch

    from ..nn import quantized_layers

    out: dict[str, list[int]] = {}
    for name, layer in quantized_layers(model):
        counts = sum(torch.bincount(c.bits.flatten().long(), minlength=layer.max_bit + 1)
                     for _, c in layer.constraints())
        out[name] = [int(v) for v in counts.tolist()]
    return out


def _bits_histogram(w: Any, tag: str, counts: Sequence[int], step: int) -> None:
    """``counts[b]`` parameters with ``b`` frozen bits, as a TensorBoard histogram with one
    bucket per bit count (bucket b ends at b + 0.5)."""
    counts = [int(c) for c in counts]
    num = sum(counts)
    if num == 0:
        return
    used = [b for b, c in enumerate(counts) if c]
    w.add_histogram_raw(
        tag, min=float(used[0]), max=float(used[-1]), num=num,
        sum=float(sum(b * c for b, c in enumerate(counts))),
        sum_squares=float(sum(b * b * c for b, c in enumerate(counts))),
        bucket_limits=[b + 0.5 for b in range(len(counts))], bucket_counts=counts,
        global_step=step)


__all__ = ["INSTALL", "SUBDIR", "MissingTensorBoardError", "TensorBoardLog",
           "model_bits_histograms", "require"]
