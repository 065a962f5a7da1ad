"""``freeze``: the trunk learns the first task only; later tasks train their heads.

Reference: the BLIP authors' ``sgd-frozen`` baseline, github.com/Yujun-Shi/BLIP (commit
975e6dbc) ``miniImageNetClassification/src/approaches/sgd_frozen.py``: everything trains on
the first task; after it every parameter outside the classifier heads gets
``requires_grad=False``, and each later task trains by plain SGD over the parameters still
requiring a gradient, of which only its own head receives one. Followed as it is, with two
notes: the optimizer takes the run's momentum and weight decay (theirs has neither; every
preset's are 0, and heads other than the task's get no gradient, so only its head moves
either way), and BatchNorm running statistics stay as the first task left them (their
baseline net has no BatchNorm; with one, their ``model.train()`` would keep updating them).
"""

from __future__ import annotations

from torch import nn

from ..modes import freeze_batchnorm_stats
from .base import Method, heads, register


@register
class Freeze(Method):
    """Train everything on task 0, then only the current task's head (trunk frozen,
    BatchNorm running statistics included): the BLIP authors' ``sgd-frozen``."""

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
