"""The trunk of a multi-head model and the masked-gradient SGD that HAT and PackNet share.

HAT (``hat.py``) and PackNet (``packnet.py``) act on the *trunk*: every ``nn.Linear`` /
``nn.Conv2d`` of the model that is not under ``model.heads`` (the per-task heads are
trained only by their own task's loss, so they need no protection). Both evaluate
task ``t`` through :meth:`Method.eval_context`, which the trainer enters around every
evaluation, with task ``t``'s own mask.

Weight decay: both build plain SGD *without* weight decay and add ``weight_decay·θ``
to the gradients in ``after_backward`` before masking them, so neither weight decay
nor momentum (whose buffer only ever sees the masked, zero gradient; a fresh
optimizer is made per task) can move a protected weight: it stays bit-identical.

BatchNorm (ResNet-18): HAT leaves the running statistics shared across tasks, as the
other baselines do (the HAT paper's nets had no BatchNorm), so a BatchNorm net can
still drift; PackNet freezes them after the first task, as its paper does.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import validate
from .base import Method, check

Layer = nn.Linear | nn.Conv2d


def trunk_layers(model: nn.Module) -> list[tuple[str, Layer]]:
    """The ``nn.Linear`` / ``nn.Conv2d`` modules outside ``model.heads``, in registration
    order (quantized subclasses included)."""
    out = [(n, m) for n, m in model.named_modules()
           if isinstance(m, (nn.Linear, nn.Conv2d)) and n != "heads"
           and not n.startswith("heads.")]
    if not out:
        raise ValueError("the model has no nn.Linear/nn.Conv2d layers outside `heads`")
    return out


def layer_units(layer: Layer) -> tuple[int, int]:
    """(output units, input units) of a layer; input 0 when a unit mask cannot index the
    weight's input dimension (grouped convolutions)."""
    if isinstance(layer, nn.Linear):
        return layer.out_features, layer.in_features
    return layer.out_channels, layer.in_channels if layer.groups == 1 else 0


def sgd_without_decay(params: list[nn.Parameter], lr: float,
                      momentum: float) -> torch.optim.Optimizer:
    # weight decay is added to the gradients before they are masked (see the module doc)
    validate.number("lr", lr, lo=0.0)  # finite in float32: torch's SGD would take 1e39
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=0.0)


def add_weight_decay(params: list[nn.Parameter], wd: float) -> None:
    if wd:
        for p in params:
            if p.grad is not None:
                p.grad.add_(p.detach(), alpha=wd)


def per_unit(mask: Tensor, weight: Tensor, dim: int) -> Tensor:
    """``mask`` (one value per unit of ``weight``'s dimension ``dim``) shaped to broadcast."""
    shape = [1] * weight.dim()
    shape[dim] = -1
    return mask.view(shape)


def check_task_order(method: Method, task: int, done: int) -> None:
    check(isinstance(task, int) and task >= done,
           f"method {method.name!r}: task {task!r} comes after {done} finished tasks; tasks "
           f"must run in order from 0 (a finished task cannot be trained again)")
