"""``si``: Synaptic Intelligence as Avalanche's SynapticIntelligencePlugin."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .base import Params, check, load_params, nonneg, register, snapshot
from .quadratic import QuadraticPenaltyMethod


def si_parameters(model: nn.Module) -> list[str]:
    """Names of the parameters SI regularises: the trainable ones outside normalisation
    layers (Avalanche excludes every ``_NormBase`` layer's parameters)."""
    norm = {f"{m_name}.{p_name}" if m_name else p_name
            for m_name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._NormBase)
            for p_name, _ in m.named_parameters(recurse=False)}
    return [n for n, p in model.named_parameters() if p.requires_grad and n not in norm]


@register
class SI(QuadraticPenaltyMethod):
    """Synaptic Intelligence (Zenke et al. 2017) following Avalanche's plugin.

    Reference: ContinualAI/avalanche, ``avalanche/training/plugins/synaptic_intelligence.py``
    (``SynapticIntelligencePlugin(si_lambda, eps=1e-7)``). Followed by default: every
    step, ``ω_i −= g_i·Δθ_i`` with ``g`` the gradient of the loss *with* the SI penalty
    (its ``.grad`` after the step) and ``Δθ`` the step's actual update; after a task,
    ``S_i += ω_i / ((θ_end,i − θ_start,i)² + ξ)`` summed over tasks (ξ = its ``eps``),
    the importance ``Ω = min(S, omega_max)`` (its ``clip_to=0.001``; no clip below: a
    negative path integral gives a negative Ω), anchor ``θ_end``; penalty
    ``c/2 · Σ_i Ω_i (θ_i − θ*_i)²`` (``c`` = its ``si_lambda``) over the trainable
    parameters outside normalisation layers. Avalanche has no default ``si_lambda``, and
    Zenke et al.'s permuted-MNIST c = 0.1 assumes their unclipped Ω: under the clip at 1e-3
    it is almost no penalty (pdigits, seed 0: ACC 90.4 / BWT −7.1 at c = 0.1, 95.4 / −0.00
    at 1e3, 95.4 / −0.03 at 1e5), so the default is c = 1e3 (docs/baselines.md).

    Deliberate difference: the project's default ``penalty_step="proximal"`` (the penalty
    is a pull after each step, see :class:`QuadraticPenaltyMethod`); then ``g`` adds the
    penalty's gradient ``c·Ω(θ − θ*)`` at the step's start to ``.grad``, so both forms
    integrate the same quantity; ``"gradient"`` puts the penalty in the loss as Avalanche
    does. States saved before these conventions (clipped-at-zero Ω per task) are refused.
    """

    name = "si"
    # DDP-safe (README.md, "Distributed"): the path integral uses the all-reduced gradients
    DISTRIBUTED = None
    HPARAMS: ClassVar[dict[str, Any]] = {
        **QuadraticPenaltyMethod.HPARAMS,
        "c": 1e3,  # c = si_lambda (Avalanche: no default; 0.1 is ~no penalty under the clip)
        "xi": 1e-7,  # ξ, damping of the squared total displacement (Avalanche's eps)
        "omega_max": 1e-3,  # Ω is clipped above at this (Avalanche's clip_to)
    }

    def __init__(self, model: nn.Module, **hparams: Any) -> None:
        super().__init__(model, **hparams)
        nonneg(self.name, self.hparams, "c")
        for k in ("xi", "omega_max"):
            check(isinstance(self.hparams[k], (int, float)) and self.hparams[k] > 0,
                  f"method 'si': {k} must be a number > 0; got {self.hparams[k]!r}")
        self.importance_sum: Params = {}  # S, Σ over tasks of ω/(Δ² + ξ), unclipped
        self.omega_total: Params = {}  # Ω = min(S, omega_max), derived from S
        self.anchor: Params = {}  # θ* after the last task
        self.path: Params = {}  # ω, this task's path integral
        self.start: Params = {}  # θ at this task's start
        self._grad: Params = {}  # the (penalised) gradient of the current step
        self._before: Params = {}  # θ before the current step

    @property
    def strength(self) -> float:
        return 0.5 * self.hparams["c"]

    def quadratic(self) -> tuple[Params, Params]:
        return self.omega_total, self.anchor

    def before_task(self, task: int) -> None:
        self.start = snapshot(self.model, si_parameters(self.model))
        self.path = {n: torch.zeros_like(p) for n, p in self.start.items()}

    def after_backward(self, task: int) -> None:
        if not self.start:
            raise RuntimeError("method 'si': call before_task() before training")
        proximal = self.hparams["penalty_step"] == "proximal"
        self._grad, self._before = {}, {}
        with torch.no_grad():
            params = dict(self.model.named_parameters())
            for n in self.path:
                p = params[n]
                if p.grad is None:
                    continue
                g = p.grad.detach().clone()
                if proximal and n in self.omega_total:  # d/dθ of c/2·Ω(θ−θ*)², not in .grad
                    g += 2 * self.strength * self.omega_total[n] * (p - self.anchor[n])
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
        end = snapshot(self.model, self.path)
        for n, w in self.path.items():
            new = w / ((end[n] - self.start[n]).pow(2) + xi)
            s = self.importance_sum
            s[n] = s[n] + new if n in s else new
        self.omega_total = self._clipped(self.importance_sum)
        self.anchor = end
        self.path, self.start = {}, {}
        self._changed()
        return {"importance_mean": float(torch.cat([o.flatten() for o in
                                                    self.omega_total.values()]).mean())}

    def _clipped(self, importance_sum: Params) -> Params:
        return {n: s.clamp(max=self.hparams["omega_max"]) for n, s in importance_sum.items()}

    STATE = ("importance_sum", "anchor")

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "path": self.path, "start": self.start}

    def _other_state(self, state: dict[str, Any]) -> dict[str, Any]:
        return {"path": load_params(state.get("path", {}), self.model, "path"),
                "start": load_params(state.get("start", {}), self.model, "start"),
                "omega_total": self._clipped(load_params(state["importance_sum"], self.model,
                                                         "importance_sum"))}
