"""Task streams: the containers every loader returns and the trainer consumes."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch


class DataFormatError(RuntimeError):
    """A data file is missing or not in the format its loader expects."""


@dataclass
class TaskData:
    """One task: train/valid/test tensors with labels in 0..n_classes-1.

    Inputs may be stored as uint8 (full benchmarks, to keep 10 copies of MNIST or
    mini-ImageNet in memory); `inputs()` turns a batch into normalised float32.
    """

    name: str
    n_classes: int
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_valid: torch.Tensor
    y_valid: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        """Float32 network input for a batch taken from this task's tensors."""
        x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
        if self.mean is not None and self.std is not None:
            # per-channel statistics broadcast over N x C x H x W (or N x C)
            shape = (1, -1) + (1,) * (x.dim() - 2) if len(self.mean) > 1 else (1,)
            mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(shape)
            std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(shape)
            x = (x - mean) / std
        return x

    def sizes(self) -> tuple[int, int, int]:
        return len(self.y_train), len(self.y_valid), len(self.y_test)


@dataclass
class TaskStream:
    """An ordered sequence of tasks sharing one input shape (one head per task)."""

    name: str
    tasks: list[TaskData]
    input_shape: tuple[int, ...]
    meta: dict = field(default_factory=dict)

    @property
    def classes_per_task(self) -> list[int]:
        return [t.n_classes for t in self.tasks]

    @property
    def in_features(self) -> int:
        return math.prod(self.input_shape)

    def __len__(self) -> int:
        return len(self.tasks)

    def __getitem__(self, i: int) -> TaskData:
        return self.tasks[i]

    def __iter__(self):
        return iter(self.tasks)

    def truncated(self, n_tasks: int) -> TaskStream:
        """The first `n_tasks` tasks (for quick runs and tests)."""
        if not 1 <= n_tasks <= len(self.tasks):
            raise ValueError(f"n_tasks={n_tasks} must be in 1..{len(self.tasks)} for {self.name}")
        return TaskStream(self.name, self.tasks[:n_tasks], self.input_shape, dict(self.meta))


def shuffled_indices(n: int, seed: int) -> np.ndarray:
    """The permutation `sklearn.utils.shuffle(arange(n), random_state=seed)` gives,
    which is what the authors' loaders use for splits, without needing sklearn."""
    return np.random.RandomState(seed).permutation(n)


def split_valid(
    x: torch.Tensor, y: torch.Tensor, frac: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hold out `frac` of (x, y) for validation, the authors' way: shuffle with `seed`,
    the first int(frac*n) go to validation. frac == 0 reuses the training set as the
    validation set (the authors' PMNIST), sharing memory."""
    if frac <= 0:
        return x, y, x, y
    r = torch.from_numpy(shuffled_indices(len(y), seed))
    n_valid = int(frac * len(r))
    iv, it = r[:n_valid], r[n_valid:]
    return x[it], y[it], x[iv], y[iv]


def make_task(
    name: str,
    n_classes: int,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    valid_frac: float,
    seed: int,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
) -> TaskData:
    xt, yt, xv, yv = split_valid(x_train, y_train, valid_frac, seed)
    return TaskData(name, n_classes, xt, yt.long(), xv, yv.long(), x_test, y_test.long(), mean, std)
