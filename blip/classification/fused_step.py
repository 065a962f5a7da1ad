"""The training step of a small MLP without autograd: the default where it applies.

On the embedded benchmarks (an MLP 64->100 at batch 16) the arithmetic of a step is ~5 µs;
the eager step spends ~90 µs more in module calls and torch's autograd engine (graph
nodes, saved tensors, gradient accumulation). :class:`FusedStep` runs the forward, the
cross-entropy and the backward as the very ATen ops autograd calls for
``F.cross_entropy(model(x, task), y)`` (read off a dispatch trace; listed below), under
no_grad, writes each parameter's ``.grad`` as autograd's AccumulateGrad would, then runs
the method's optimizer step as the eager step does. Same ops on the same operands: the
gradients, hence the weights, BLIP bits and accuracies, are bit-identical to the eager
step's (``tests/classification/test_fused_step.py``).

Per layer, with ``g`` the gradient of the layer's output:
- ``Linear``: forward ``F.linear`` itself (on 2-D input ``addmm(b, a, W.t())``, ``mm``
  without bias); backward ``mm(g, W)`` (input), ``mm(g.t(), a)`` (weight, as autograd's
  transposed ``mm_mat2_backward``), ``sum(g, [0], keepdim=True).view(-1)`` (bias: sum_to).
- ``ReLU``: ``relu(a)``; backward ``threshold_backward(g, out, 0)``.
- cross-entropy (mean, no weight): ``_log_softmax(z, 1, False)``, ``nll_loss_forward``;
  backward ``nll_loss_backward(1, ...)``, ``_log_softmax_backward_data``.

:func:`unsupported` decides once per task whether a (method, model, task) is eligible:
a :class:`blip.models.MLP` as built (a trunk of Linear / ReLU, Linear heads; BLIP's
QuantLinear in its default ``forward_mode="continuous"``, where its forward is
``F.linear``), a method with the base per-step hooks (its loss is the plain
cross-entropy), no module or parameter hooks, no autocast, no process group of several
ranks. Anything else, a model wrapped in DistributedDataParallel included, runs the eager
step unchanged.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as _module

from ..methods import Method
from ..models import MLP, MultiHead
from ..nn import QuantLinear

# the per-step hooks; a method overriding any of them has its own step
STEP_HOOKS = ("training_loss", "after_backward", "after_step")
# torch's process-wide module hooks, any of which sees (or changes) a module call
_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks",
                 "_global_backward_hooks", "_global_backward_pre_hooks")

_aten = torch.ops.aten
# not bound as torch.* functions; an OpOverload call skips the overload resolution
_nll_loss_forward = _aten.nll_loss_forward.default
_nll_loss_backward = _aten.nll_loss_backward.default
_threshold_backward = _aten.threshold_backward.default
_MEAN, _IGNORE_INDEX = 1, -100  # F.cross_entropy's defaults (reduction="mean")


class _Linear(NamedTuple):
    weight: Tensor
    bias: Tensor | None
    grad_weight: bool  # whether the parameter requires a gradient (fixed for the task)
    grad_bias: bool
    grad_input: bool  # whether a layer before this one needs a gradient


_RELU = None  # a ReLU in the layer list


def own_step_hooks(method: type[Method]) -> list[str]:
    """The per-step hooks ``method`` overrides (empty: the base protocol's step)."""
    return [h for h in STEP_HOOKS if getattr(method, h) is not getattr(Method, h)]


def _layer_unsupported(name: str, m: nn.Module) -> str | None:
    if type(m) is nn.ReLU:
        return None
    if type(m) not in (nn.Linear, QuantLinear):
        return f"{name} is a {type(m).__name__}"
    if isinstance(m, QuantLinear) and m.forward_mode != "continuous":
        return f"{name} has forward_mode={m.forward_mode!r}"
    return None


def unsupported(method: Method, net: nn.Module, task: int) -> str | None:
    """Why the fused step cannot run this task's step exactly as the eager one; None if
    it can."""
    cls = type(net)
    if not isinstance(net, MLP) or cls.forward is not MultiHead.forward \
            or cls.features is not MLP.features:
        return f"the model is a {cls.__name__}, not a blip.models.MLP"
    own = own_step_hooks(type(method))
    if own:
        return f"method {method.name!r} has its own per-step hooks ({', '.join(own)})"
    if not (isinstance(task, int) and 0 <= task < len(net.heads)):
        return f"task {task!r} has no head"
    if not isinstance(net.trunk, nn.Sequential):
        return "the trunk is not an nn.Sequential"
    for name, m in (*(("trunk." + n, m) for n, m in net.trunk.named_children()),
                    (f"heads.{task}", net.heads[task])):
        why = _layer_unsupported(name, m)
        if why:
            return why
    for name, m in net.named_modules():
        if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks \
                or m._backward_pre_hooks:
            return f"module {name or 'model'!r} has hooks"
    if any(getattr(_module, h, None) for h in _GLOBAL_HOOKS):
        return "global module hooks are registered"
    params = list(net.parameters())
    for name, p in net.named_parameters():
        if p._backward_hooks or getattr(p, "_post_accumulate_grad_hooks", None):
            return f"parameter {name!r} has hooks"
        if p.dtype != params[0].dtype or p.device != params[0].device:
            return "the parameters differ in dtype or device"
    if not any(p.requires_grad for p in [*net.trunk.parameters(),
                                         *net.heads[task].parameters()]):
        return "no parameter of the task's layers requires a gradient"
    if torch.is_autocast_enabled(params[0].device.type):
        return "autocast is enabled"
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        # whatever wraps the model, gradients of a distributed run are all-reduced by
        # DistributedDataParallel's autograd hooks: such a run stays on the autograd step
        return "a distributed process group of several ranks is initialized"
    return None


class FusedStep:
    """``step(x, y)``: one training step of ``method`` on task ``task``'s head, as
    :func:`blip.classification.step.eager_step` computes it, without autograd. Build it
    only where :func:`unsupported` returns None (the plan is fixed for the task:
    requires_grad flags, the layer list)."""

    def __init__(self, method: Method, net: MLP, opt: torch.optim.Optimizer,
                 task: int) -> None:
        why = unsupported(method, net, task)
        if why is not None:
            raise ValueError(f"the fused step does not apply: {why}")
        self.method, self.opt, self.task = method, opt, task
        mods = [*net.trunk, net.heads[task]]
        layers: list[_Linear | None] = []
        needs = False  # does any earlier layer's parameter require a gradient
        for m in mods:
            if type(m) is nn.ReLU:
                layers.append(_RELU)
                continue
            b = m.bias
            gw, gb = m.weight.requires_grad, b is not None and b.requires_grad
            layers.append(_Linear(m.weight, b, gw, gb, needs))
            needs = needs or gw or gb
        # the backward stops at the first layer from the input that needs a gradient
        self.layers = layers
        self.first = next(i for i, layer in enumerate(layers)
                          if layer is not None and (layer.grad_weight or layer.grad_bias))
        p = mods[-1].weight
        self._one = torch.ones((), dtype=p.dtype, device=p.device)  # d loss / d loss

    def __call__(self, x: Tensor, y: Tensor) -> Tensor:
        prev = torch.is_grad_enabled()
        torch._C._set_grad_enabled(False)  # as torch.no_grad(), without its ~3 µs
        try:
            loss, grads = self._forward_backward(x, y)
        finally:
            torch._C._set_grad_enabled(prev)
        self.opt.zero_grad(set_to_none=True)
        for p, g in grads:
            if p.grad is None:
                p.grad = g
            else:  # a parameter outside the optimizer: autograd accumulates (in place)
                p.grad.add_(g)
        self.method.after_backward(self.task)
        self.opt.step()
        self.method.after_step(self.task)
        return loss

    def _forward_backward(self, x: Tensor, y: Tensor
                          ) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
        a = x.reshape(x.shape[0], -1)  # MLP.features
        saved: list[Tensor] = []  # each layer's input (Linear) or output (ReLU)
        for layer in self.layers:
            if layer is None:
                a = torch.relu(a)
                saved.append(a)
            else:
                saved.append(a)
                a = F.linear(a, layer.weight, layer.bias)  # the eager forward's own call
        logp = torch._log_softmax(a, 1, False)
        loss, total_weight = _nll_loss_forward(logp, y, None, _MEAN, _IGNORE_INDEX)
        g = _nll_loss_backward(self._one, logp, y, None, _MEAN, _IGNORE_INDEX, total_weight)
        g = torch._log_softmax_backward_data(g, logp, 1, a.dtype)
        grads: list[tuple[Tensor, Tensor]] = []
        for i in range(len(self.layers) - 1, self.first - 1, -1):
            layer = self.layers[i]
            if layer is None:
                g = _threshold_backward(g, saved[i], 0)
                continue
            g_out = g
            if layer.grad_input:
                g = torch.mm(g_out, layer.weight)
            if layer.grad_weight:
                grads.append((layer.weight, torch.mm(g_out.t(), saved[i])))
            if layer.grad_bias:
                grads.append((layer.bias, torch.sum(g_out, [0], True).view(-1)))
        return loss, grads


__all__ = ["STEP_HOOKS", "FusedStep", "own_step_hooks", "unsupported"]
