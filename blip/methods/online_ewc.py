"""``online-ewc``: online EWC as Avalanche's EWC plugin in ``mode="online"``."""

from __future__ import annotations

from typing import Any, ClassVar

from torch import Tensor, nn

from .base import Params, nonneg, register, snapshot
from .quadratic import (
    FISHER_HPARAMS,
    QuadraticPenaltyMethod,
    check_fisher_hparams,
    reference_fisher,
    task_fisher,
)


@register
class OnlineEWC(QuadraticPenaltyMethod):
    """Online EWC (Schwarz et al. 2018) following Avalanche's EWC plugin, online mode:
    one running Fisher ``F ← γF + F_t`` and the latest anchor; penalty
    ``λ · Σ_i F_i (θ_i − θ*_i)²`` (no ½).

    Reference: ContinualAI/avalanche, ``avalanche/training/plugins/ewc.py``
    (``EWCPlugin(ewc_lambda, mode="online", decay_factor)``). Followed by default:

    * Fisher (``fisher="reference"``, its ``compute_importances``): empirical, true labels;
      the experience's training set (the end-of-task sample) in its order, in batches of
      the training batch size (``train_mb_size``; ``fisher_batch_size`` None); per batch
      the squared gradient of the batch-mean cross-entropy, summed, divided by the number
      of batches; model in eval mode; every parameter.
    * ``F_t ← γ·F_{t−1} + F_new`` (``gamma`` = its ``decay_factor``), anchor = the
      parameters after the last task; the penalty is ``λ·Σ F(θ − θ*)²``, without ½.
    * Avalanche has no default λ or γ: λ = 5000 (the BLIP authors' EWC value, so the
      two compare), γ = 1 (no decay) are this project's.

    Selectable: ``fisher="blip"`` (BLIP's true Fisher, the default before); the project's
    ``penalty_step="proximal"`` differs from the plugin's loss term, ``"gradient"``.
    States saved before these conventions are refused.
    """

    name = "online-ewc"
    # DDP-safe (README.md, "Distributed"): the Fisher is sharded and all-reduced
    DISTRIBUTED = None
    HPARAMS: ClassVar[dict[str, Any]] = {
        **QuadraticPenaltyMethod.HPARAMS,
        "lamb": 5000.0,  # λ, ewc_lambda (Avalanche has none: the BLIP authors' EWC value)
        "gamma": 1.0,  # γ, decay_factor of the running Fisher (Avalanche has none)
        **FISHER_HPARAMS,
    }
    CONVENTIONS = ("fisher",)

    def __init__(self, model: nn.Module, **hparams: Any) -> None:
        super().__init__(model, **hparams)
        nonneg(self.name, self.hparams, "lamb", "gamma")
        check_fisher_hparams(self)
        self.fisher: Params = {}
        self.anchor: Params = {}

    @property
    def strength(self) -> float:
        return self.hparams["lamb"]

    def quadratic(self) -> tuple[Params, Params]:
        return self.fisher, self.anchor

    def after_task(self, task: int, sample_x: Tensor, sample_y: Tensor) -> dict[str, Any]:
        if self.hparams["fisher"] == "blip":
            new, stats = task_fisher(self, task, sample_x)
        else:
            new, stats = reference_fisher(self, task, sample_x, sample_y, scale=1.0,
                                          training=False, shuffle=False)
        g = self.hparams["gamma"]
        self.fisher = {n: g * self.fisher[n] + f if n in self.fisher else f
                       for n, f in new.items()}
        self.anchor = snapshot(self.model, self.fisher)
        self._changed()
        return stats

    STATE = ("fisher", "anchor")
