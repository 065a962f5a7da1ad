"""Task streams for continual classification: `load_benchmark(name) -> TaskStream`."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from ...runs.safeload import trusted_pickles
from . import embedded, full
from .base import DataFormatError, TaskData, TaskStream, split_valid
from .formats import read_cifar_batch, read_idx

EMBEDDED: dict[str, Callable[..., TaskStream]] = {
    "pdigits": embedded.pdigits,
    "digits5": embedded.digits5,
    "mnist5k-split": embedded.mnist5k_split,
    "mnist5k-perm": embedded.mnist5k_perm,
    # the same stream under the authors' PMNIST settings (its own preset, presets.py)
    "mnist5k-perm-authors": embedded.mnist5k_perm,
}
FULL: dict[str, Callable[..., TaskStream]] = {
    "mnist5": full.mnist5,
    "pmnist": full.pmnist,
    "cifar-alt": full.cifar_alt,
    "mixture5": full.mixture5,
    "miniimagenet": full.miniimagenet,
}
BENCHMARKS = sorted(EMBEDDED) + sorted(FULL)


def default_data_dir() -> Path:
    return Path(os.environ.get("BLIP_DATA_DIR", "data"))


def load_benchmark(
    name: str, data_dir: str | os.PathLike | None = None, download: bool = False, seed: int = 0,
    trust_pickles: bool = False,
) -> TaskStream:
    """Build the task stream `name`; `seed` fixes the train/valid/test split (as the
    authors, the split follows the run seed) and, where the authors do so, task order.
    Pickled data files (CIFAR, mini-ImageNet) are read with a restricted unpickler
    unless ``trust_pickles`` (see :mod:`blip.runs.safeload`)."""
    if name in EMBEDDED:
        return EMBEDDED[name](seed=seed)
    if name in FULL:
        d = Path(data_dir) if data_dir is not None else default_data_dir()
        with trusted_pickles(trust_pickles):
            return FULL[name](d, seed=seed, download=download)
    raise ValueError(f"unknown benchmark {name!r}; choose one of {', '.join(BENCHMARKS)}")


__all__ = [
    "BENCHMARKS", "DataFormatError", "TaskData", "TaskStream", "load_benchmark",
    "read_cifar_batch", "read_idx", "split_valid",
]
