"""``si``: Synaptic Intelligence, path-integral importances."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .base import Params, check, load_params, nonneg, register, snapshot
from .quadratic import QuadraticPenaltyMethod


@register
class SI(QuadraticPenaltyMethod):
    """Synaptic Intelligence (Zenke et al. 2017).

    During a task, ``ω_i += −g_i·Δθ_i`` every step, with ``g`` the gradient of the
    *unregularised* task loss (as the paper: the penalty's own gradient is removed
    analytically from ``.grad``) and ``Δθ`` the optimizer's actual update. After it,
    ``Ω_i += max(ω_i, 0) / ((θ_end,i − θ_start,i)² + ξ)`` (negative path integrals,
    possible with momentum or the penalty's pull, are clipped: a negative importance
    would reward drifting), and the anchor becomes ``θ_end`` (the trainer's restored
    best model). Penalty ``c · Σ_i Ω_i (θ_i − θ*_i)²`` over every parameter.
    """

    name = "si"
    # DDP-safe (README.md, "Distributed"): the path integral uses the all-reduced gradients
    DISTRIBUTED = None
    HPARAMS: ClassVar[dict[str, Any]] = {
        **QuadraticPenaltyMethod.HPARAMS,
        "c": 0.1,  # c, penalty strength (Zenke et al.'s permuted-MNIST/CIFAR value)
        "xi": 1e-3,  # ξ, damping of the normalisation by the squared total displacement
    }

    def __init__(self, model: nn.Module, **hparams: Any) -> None:
        super().__init__(model, **hparams)
        nonneg(self.name, self.hparams, "c")
        check(isinstance(self.hparams["xi"], (int, float)) and self.hparams["xi"] > 0,
               f"method 'si': xi must be a number > 0; got {self.hparams['xi']!r}")
        self.omega_total: Params = {}  # Ω, accumulated importance
        self.anchor: Params = {}  # θ* after the last task
        self.path: Params = {}  # ω, this task's path integral
        self.start: Params = {}  # θ at this task's start
        self._grad: Params = {}  # unregularised gradient of the current step
        self._before: Params = {}  # θ before the current step

    @property
    def strength(self) -> float:
        return self.hparams["c"]

    def quadratic(self) -> tuple[Params, Params]:
        return self.omega_total, self.anchor

    def before_task(self, task: int) -> None:
        self.start = snapshot(self.model)
        self.path = {n: torch.zeros_like(p) for n, p in self.start.items()}

    def after_backward(self, task: int) -> None:
        if not self.start:
            raise RuntimeError("method 'si': call before_task() before training")
        c = self.hparams["c"]
        gradient_form = self.hparams["penalty_step"] == "gradient"
        self._grad, self._before = {}, {}
        with torch.no_grad():
            for n, p in self.model.named_parameters():
                if p.grad is None:
                    continue
                g = p.grad.detach().clone()
                if gradient_form and n in self.omega_total:  # d/dθ of c·Ω(θ−θ*)²
                    g -= 2 * c * self.omega_total[n] * (p - self.anchor[n])
                self._grad[n] = g
                self._before[n] = p.detach().clone()

    def after_step(self, task: int) -> None:
        super().after_step(task)  # the proximal penalty step, part of this step's Δθ
        with torch.no_grad():
            params = dict(self.model.named_parameters())
            for n, g in self._grad.items():
                self.path[n] -= g * (params[n] - self._before[n])
        self._grad, self._before = {}, {}

    def after_task(self, task: int, sample_x: Tensor, sample_y: Tensor) -> dict[str, Any]:
        if not self.start:
            raise RuntimeError("method 'si': after_task() without before_task()")
        xi = self.hparams["xi"]
        end = snapshot(self.model)
        for n, w in self.path.items():
            new = w.clamp(min=0) / ((end[n] - self.start[n]).pow(2) + xi)
            self.omega_total[n] = self.omega_total[n] + new if n in self.omega_total else new
        self.anchor = end
        self.path, self.start = {}, {}
        self._changed()
        return {"importance_mean": float(torch.cat([o.flatten() for o in
                                                    self.omega_total.values()]).mean())}

    def state_dict(self) -> dict[str, Any]:
        return {"omega": self.omega_total, "anchor": self.anchor, "path": self.path,
                "start": self.start}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # everything validated first, then assigned: a rejected state changes nothing
        loaded = [load_params(state.get(k, {}) if k in ("path", "start") else state[k],
                              self.model, k) for k in ("omega", "anchor", "path", "start")]
        self.omega_total, self.anchor, self.path, self.start = loaded
        self._changed()
