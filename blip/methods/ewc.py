"""``ewc``: Elastic Weight Consolidation, one summed penalty over the finished tasks."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .base import Params, nonneg, pos_int, register, seed_ok, snapshot
from .quadratic import FISHER_HPARAMS, QuadraticPenaltyMethod, task_fisher


def _weighted_anchor(f_old: Tensor, a_old: Tensor, f_new: Tensor, a_new: Tensor) -> Tensor:
    """Anchor of ``f_old(θ−a_old)² + f_new(θ−a_new)²`` (same θ-gradient, up to a constant)."""
    total = f_old + f_new
    merged = (f_old * a_old + f_new * a_new) / total.clamp_min(1e-38)
    return torch.where(total > 0, merged, a_new)



@register
class EWC(QuadraticPenaltyMethod):
    """EWC (Kirkpatrick et al. 2017): penalty ``λ/2 · Σ_k Σ_i F_k,i (θ_i − θ*_k,i)²`` over
    the finished tasks ``k``, kept in its summed form ``λ/2 · Σ_i F_i (θ_i − θ̄_i)²`` with
    ``F = Σ_k F_k`` and ``θ̄ = Σ_k F_k θ*_k / F`` (the same gradient, so the same training,
    at constant memory and one term per parameter instead of one per task)."""

    name = "ewc"
    # DDP-safe (README.md, "Distributed"): the Fisher is sharded and all-reduced
    DISTRIBUTED = None
    HPARAMS: ClassVar[dict[str, Any]] = {
        **QuadraticPenaltyMethod.HPARAMS,
        "lamb": 5000.0,  # λ, penalty strength (the BLIP/HAT authors' EWC baseline value)
        **FISHER_HPARAMS,
    }

    def __init__(self, model: nn.Module, **hparams: Any) -> None:
        super().__init__(model, **hparams)
        nonneg(self.name, self.hparams, "lamb")
        pos_int(self.name, self.hparams, "fisher_batches", "fisher_batch_size")
        seed_ok(self.name, self.hparams)
        self.fisher: Params = {}  # Σ_k F_k
        self.anchor: Params = {}  # Fisher-weighted mean of the task anchors
        self.tasks = 0

    @property
    def strength(self) -> float:
        return 0.5 * self.hparams["lamb"]

    def quadratic(self) -> tuple[Params, Params]:
        return self.fisher, self.anchor

    def absorb(self, fisher: Params, anchor: Params) -> None:
        """Add one finished task's term ``F_k (θ − θ*_k)²`` to the summed penalty."""
        for n, f in fisher.items():
            if n in self.fisher:
                self.anchor[n] = _weighted_anchor(self.fisher[n], self.anchor[n], f, anchor[n])
                self.fisher[n] = self.fisher[n] + f
            else:
                self.fisher[n], self.anchor[n] = f, anchor[n]
        self.tasks += 1
        self._changed()

    def after_task(self, task: int, sample_x: Tensor, sample_y: Tensor) -> dict[str, Any]:
        fisher, stats = task_fisher(self, task, sample_x)
        self.absorb(fisher, snapshot(self.model, fisher))
        return stats

    STATE = ("fisher", "anchor")

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "tasks": self.tasks}

    def _other_state(self, state: dict[str, Any]) -> dict[str, Any]:
        return {"tasks": int(state["tasks"])}
