"""``online-ewc``: online EWC, one running Fisher and the latest anchor."""

from __future__ import annotations

from typing import Any, ClassVar

from torch import Tensor, nn

from .base import Params, nonneg, pos_int, register, seed_ok, snapshot
from .quadratic import FISHER_HPARAMS, QuadraticPenaltyMethod, task_fisher


@register
class OnlineEWC(QuadraticPenaltyMethod):
    """Online EWC (Schwarz et al. 2018): one running Fisher ``F ← γF + F_t`` and the
    latest anchor; penalty ``λ/2 · Σ_i F_i (θ_i − θ*_i)²``."""

    name = "online-ewc"
    # DDP-safe (README.md, "Distributed"): the Fisher is sharded and all-reduced
    DISTRIBUTED = None
    HPARAMS: ClassVar[dict[str, Any]] = {
        **QuadraticPenaltyMethod.HPARAMS,
        "lamb": 5000.0,  # λ, penalty strength (as our EWC, so the two compare directly)
        "gamma": 1.0,  # γ, decay of the running Fisher per task (1: no forgetting)
        **FISHER_HPARAMS,
    }

    def __init__(self, model: nn.Module, **hparams: Any) -> None:
        super().__init__(model, **hparams)
        nonneg(self.name, self.hparams, "lamb", "gamma")
        pos_int(self.name, self.hparams, "fisher_batches", "fisher_batch_size")
        seed_ok(self.name, self.hparams)
        self.fisher: Params = {}
        self.anchor: Params = {}

    @property
    def strength(self) -> float:
        return 0.5 * self.hparams["lamb"]

    def quadratic(self) -> tuple[Params, Params]:
        return self.fisher, self.anchor

    def after_task(self, task: int, sample_x: Tensor, sample_y: Tensor) -> dict[str, Any]:
        new, stats = task_fisher(self, task, sample_x)
        g = self.hparams["gamma"]
        self.fisher = {n: g * self.fisher[n] + f if n in self.fisher else f
                       for n, f in new.items()}
        self.anchor = snapshot(self.model, self.fisher)
        self._changed()
        return stats

    STATE = ("fisher", "anchor")
