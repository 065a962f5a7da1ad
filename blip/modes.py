"""Module-mode helpers the core and the methods share: a train/eval-mode context that
restores every module's own flag, and BatchNorm statistics frozen in place or in eval
mode."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def module_modes(model: nn.Module) -> dict[nn.Module, bool]:
    """Every submodule's train/eval flag, for :func:`restore_modes`."""
    return {m: m.training for m in model.modules()}


def restore_modes(modes: dict[nn.Module, bool]) -> None:
    for m, flag in modes.items():
        m.training = flag


@contextlib.contextmanager
def train_mode(model: nn.Module, training: bool) -> Iterator[nn.Module]:
    """``model.train(training)`` inside; on exit every submodule gets back its own flag
    (a model may hold modules in different modes, e.g. a frozen copy in eval mode)."""
    modes = module_modes(model)
    try:
        model.train(training)
        yield model
    finally:
        restore_modes(modes)


def freeze_batchnorm_stats(model: nn.Module) -> None:
    """Running statistics of every BatchNorm stay as they are (momentum 0) from now on."""
    for m in batchnorm_layers(model):
        m.momentum = 0.0


def batchnorm_eval(model: nn.Module) -> None:
    """Every BatchNorm in eval mode until the next ``model.train()``: training batches are
    normalised with the running statistics, which no longer change (the authors'
    mini-ImageNet train_epoch from task 1 on; unlike :func:`freeze_batchnorm_stats`, which
    keeps normalising with each batch's own statistics)."""
    for m in batchnorm_layers(model):
        m.eval()


__all__ = ["batchnorm_eval", "batchnorm_layers", "freeze_batchnorm_stats", "module_modes",
           "restore_modes", "train_mode"]
