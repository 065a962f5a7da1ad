"""``ewc``: Elastic Weight Consolidation as the BLIP authors' EWC baseline."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .base import Params, check, nonneg, register, snapshot
from .quadratic import (
    FISHER_HPARAMS,
    QuadraticPenaltyMethod,
    check_fisher_hparams,
    reference_fisher,
    task_fisher,
)

ACCUMULATE = ("average", "sum")


def _weighted_anchor(f_old: Tensor, a_old: Tensor, f_new: Tensor, a_new: Tensor) -> Tensor:
    """Anchor of ``f_old(θ−a_old)² + f_new(θ−a_new)²`` (same θ-gradient, up to a constant)."""
    total = f_old + f_new
    merged = (f_old * a_old + f_new * a_new) / total.clamp_min(1e-38)
    return torch.where(total > 0, merged, a_new)


@register
class EWC(QuadraticPenaltyMethod):
    """EWC (Kirkpatrick et al. 2017) following the BLIP authors' baseline: penalty
    ``λ/2 · Σ_i F̄_i (θ_i − θ_prev,i)²`` with F̄ the average of the tasks' Fishers and
    θ_prev the model after the previous task.

    Reference: Yujun-Shi/BLIP, ``miniImageNetClassification/src/approaches/ewc.py`` with
    ``utils.py`` ``fisher_matrix_diag`` (the EWC baseline of the BLIP paper; HAT's
    ``joansj/hat`` ``src/approaches/ewc.py`` is the same but for the Fisher's divisor, below).
    The BLIP authors' image-classification folder has no EWC. Followed by default:

    * Fisher (``fisher="reference"``): empirical, with the true labels; the task's training
      set (the end-of-task sample) shuffled, in batches of the training batch size (their
      ``trainloader``; ``fisher_batch_size`` None); per batch the squared gradient of the
      batch-mean cross-entropy times ``fisher_scale`` = 20 (their ``sbatch=20``), summed,
      divided by the number of batches (``len(trainloader)``; HAT divides by the sample
      count, with batches of 20); model in train mode; every parameter.
    * tasks' Fishers averaged: ``F̄ ← (F_t + t·F̄)/(t+1)`` (``accumulate="average"``);
      anchor: the model after the last task (their ``model_old``); λ = 5000, times ½.
    * Not here: their per-step gradient-norm clip at 100 (the trainer's loop).

    Selectable: ``fisher="blip"`` (BLIP's true Fisher, this method's default before) and
    ``accumulate="sum"`` (Σ_k F_k (θ − θ*_k)², kept as F(θ − θ̄) with the Fisher-weighted
    anchor θ̄: the paper's form, this method's default before). The project's default
    ``penalty_step="proximal"`` (see :class:`QuadraticPenaltyMethod`) differs from their
    penalty in the loss, ``"gradient"``. States saved before these conventions are refused.
    """

    name = "ewc"
    # DDP-safe (README.md, "Distributed"): the Fisher is sharded and all-reduced
    DISTRIBUTED = None
    HPARAMS: ClassVar[dict[str, Any]] = {
        **QuadraticPenaltyMethod.HPARAMS,
        "lamb": 5000.0,  # λ (the BLIP/HAT authors' EWC baseline value, their grid's best)
        "accumulate": "average",  # "average" (the authors') or "sum" (the paper's)
        "fisher_scale": 20.0,  # the authors' fisher_matrix_diag(sbatch=20) factor
        **FISHER_HPARAMS,
    }
    CONVENTIONS = ("fisher", "accumulate")

    def __init__(self, model: nn.Module, **hparams: Any) -> None:
        super().__init__(model, **hparams)
        nonneg(self.name, self.hparams, "lamb", "fisher_scale")
        check(self.hparams["accumulate"] in ACCUMULATE,
              f"method 'ewc': accumulate must be one of {ACCUMULATE}; got "
              f"{self.hparams['accumulate']!r}")
        check_fisher_hparams(self)
        self.fisher: Params = {}  # F̄ (average) or Σ_k F_k (sum)
        self.anchor: Params = {}  # θ after the last task (average) or θ̄ (sum)
        self.tasks = 0

    @property
    def strength(self) -> float:
        return 0.5 * self.hparams["lamb"]

    def quadratic(self) -> tuple[Params, Params]:
        return self.fisher, self.anchor

    def absorb(self, fisher: Params, anchor: Params) -> None:
        """Take one finished task's Fisher ``F_t`` and anchor ``θ*_t`` into the penalty."""
        t = self.tasks
        for n, f in fisher.items():
            if n not in self.fisher:
                self.fisher[n], self.anchor[n] = f, anchor[n]
            elif self.hparams["accumulate"] == "average":
                self.fisher[n] = (f + self.fisher[n] * t) / (t + 1)
                self.anchor[n] = anchor[n]
            else:
                self.anchor[n] = _weighted_anchor(self.fisher[n], self.anchor[n], f, anchor[n])
                self.fisher[n] = self.fisher[n] + f
        self.tasks += 1
        self._changed()

    def after_task(self, task: int, sample_x: Tensor, sample_y: Tensor) -> dict[str, Any]:
        if self.hparams["fisher"] == "blip":
            fisher, stats = task_fisher(self, task, sample_x)
        else:
            fisher, stats = reference_fisher(self, task, sample_x, sample_y,
                                             scale=self.hparams["fisher_scale"], training=True,
                                             shuffle=True)
        self.absorb(fisher, snapshot(self.model, fisher))
        return stats

    STATE = ("fisher", "anchor")

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "tasks": self.tasks}

    def _other_state(self, state: dict[str, Any]) -> dict[str, Any]:
        return {"tasks": int(state["tasks"])}
