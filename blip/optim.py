"""SGD fused with the BLIP bit constraint, and the projection for any other optimizer."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn

import blip_kernels

from .nn import quantized_layers


def _constraint_map(model: nn.Module) -> dict[Tensor, tuple[nn.Module, str]]:
    # Keyed by the Parameter object (tensors hash by identity). The buffers are
    # read at step time through the layer, so .to()/load_state_dict stay safe.
    found: dict[Tensor, tuple[nn.Module, str]] = {}
    for _, layer in quantized_layers(model):
        for name in layer.blip_param_names():
            found[getattr(layer, name)] = (layer, name)
    return found


class ConstrainedSGD(torch.optim.Optimizer):
    """``torch.optim.SGD`` whose step on BLIP-constrained parameters is fused with the
    section-4 projection (:func:`blip_kernels.constrained_sgd_step_`).

    Parameters of quantized layers (found through ``model``) get the fused kernel;
    all others (task heads, norms) get plain SGD math, identical to torch's. The
    momentum buffer of a constrained parameter is fp32. A NaN/Inf gradient element
    of a constrained parameter is skipped and counted (:meth:`skipped_nonfinite`);
    plain parameters behave as torch's SGD does (no skipping).

    ``params`` may be the model itself (then ``model`` defaults to it) or any
    iterable of parameters / param groups, in which case ``model`` is required.
    """

    def __init__(
        self,
        params: nn.Module | Iterable[Tensor] | Iterable[dict],
        lr: float,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        model: nn.Module | None = None,
    ) -> None:
        if isinstance(params, nn.Module):
            model = params if model is None else model
            params = params.parameters()
        if model is None:
            raise TypeError("model is required (to find the BLIP constraints) unless params "
                            "is the model itself")
        if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr >= 0):
            raise ValueError(f"lr must be a finite number >= 0; got {lr!r}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1); got {momentum!r}")
        if not 0.0 <= dampening <= 1.0:
            raise ValueError(f"dampening must be in [0, 1]; got {dampening!r}")
        if not (math.isfinite(weight_decay) and weight_decay >= 0):
            raise ValueError(f"weight_decay must be a finite number >= 0; got {weight_decay!r}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("nesterov requires momentum > 0 and dampening == 0")
        defaults = {"lr": lr, "momentum": momentum, "dampening": dampening,
                    "weight_decay": weight_decay, "nesterov": nesterov}
        super().__init__(params, defaults)
        self._constraints = _constraint_map(model)
        self._skipped: dict[torch.device, Tensor] = {}

    def _add_skipped(self, count: Tensor) -> None:
        acc = self._skipped.get(count.device)
        self._skipped[count.device] = count if acc is None else acc + count

    def skipped_nonfinite(self) -> int:
        """Elements skipped for a NaN/Inf gradient since construction (one sync)."""
        return sum(int(t) for t in self._skipped.values())

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001, ANN201 - torch's signature
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # bits only change in update_bits_ (which caps them) and are checked on
        # load_state_dict, so the per-step data-dependent check (a sync) is skipped.
        with blip_kernels.value_checks(False):
            for group in self.param_groups:
                self._step_group(group)
        return loss

    def _step_group(self, group: dict) -> None:
        lr = float(group["lr"])
        momentum, dampening = float(group["momentum"]), float(group["dampening"])
        wd, nesterov = float(group["weight_decay"]), bool(group["nesterov"])
        for p in group["params"]:
            grad = p.grad
            if grad is None:
                continue
            if grad.is_sparse:
                raise RuntimeError("ConstrainedSGD does not support sparse gradients")
            state = self.state[p]
            target = self._constraints.get(p)
            if target is None:
                self._plain_sgd(p, grad, state, lr, momentum, dampening, wd, nesterov)
                continue
            layer, name = target
            buf, damp = None, dampening
            if momentum != 0:
                buf = state.get("momentum_buffer")
                if buf is None:
                    # torch's first step sets buf = g; 0·momentum + (1-0)·g is exactly g.
                    buf = torch.zeros_like(p, dtype=torch.float32,
                                           memory_format=torch.contiguous_format)
                    state["momentum_buffer"] = buf
                    damp = 0.0
                elif buf.dtype != torch.float32:  # Optimizer.load_state_dict casts to p.dtype
                    buf = buf.float()
                    state["momentum_buffer"] = buf
            count = blip_kernels.constrained_sgd_step_(
                p, grad, getattr(layer, f"prev_{name}"), getattr(layer, f"bits_{name}"),
                layer.bound_of(name), layer.max_bit, lr, buf, momentum, damp, nesterov, wd,
            )
            self._add_skipped(count)

    @staticmethod
    def _plain_sgd(p: Tensor, grad: Tensor, state: dict, lr: float, momentum: float,
                   dampening: float, wd: float, nesterov: bool) -> None:
        d_p = grad if wd == 0 else grad.add(p, alpha=wd)
        if momentum != 0:
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = torch.clone(d_p).detach()
                state["momentum_buffer"] = buf
            else:
                buf.mul_(momentum).add_(d_p, alpha=1 - dampening)
            d_p = d_p.add(buf, alpha=momentum) if nesterov else buf
        p.add_(d_p, alpha=-lr)


def project_model_(model: nn.Module) -> Tensor | None:
    """Section-4 projection of every quantized layer, for use after any optimizer step.

    Returns the number of NaN/Inf weights reset to ``prev`` as an int64 0-d tensor
    (no sync), or None if the model has no quantized layer.
    """
    total = None
    with blip_kernels.value_checks(False), torch.no_grad():
        for _, layer in quantized_layers(model):
            n = layer.project_()
            total = n if total is None else total + n.to(total.device)
    return total


__all__ = ["ConstrainedSGD", "project_model_"]
