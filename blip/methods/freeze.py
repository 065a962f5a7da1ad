"""``freeze``: the trunk learns the first task only; later tasks train their heads."""

from __future__ import annotations

from torch import nn

from ..modes import freeze_batchnorm_stats
from .base import Method, heads, register


@register
class Freeze(Method):
    """Train everything on task 0, then only the current task's head (trunk frozen,
    BatchNorm running statistics included)."""

    name = "freeze"
    # DDP-safe (README.md, "Distributed"): gradients only (the frozen trunk is not updated)
    DISTRIBUTED = None

    def prepare(self) -> nn.Module:
        heads(self)
        return self.model

    def trainable_parameters(self, task: int) -> list[nn.Parameter]:
        if task == 0:
            return list(self.model.parameters())
        return list(heads(self)[task].parameters())

    def before_task(self, task: int) -> None:
        if task == 0:
            return
        head_ids = {id(p) for p in heads(self).parameters()}
        for p in self.model.parameters():
            if id(p) not in head_ids:
                p.requires_grad_(False)
        freeze_batchnorm_stats(self.model)  # running stats stay as task 0 left them
