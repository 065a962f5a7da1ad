"""``imm-mode``: mode-IMM, L2 transfer during a task and a Fisher-weighted merge after it."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
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
class IMMMode(QuadraticPenaltyMethod):
    """Mode-IMM (Lee et al. 2017) as the BLIP authors' mini-ImageNet baseline: train
    each task from the previous (merged) model (weight transfer) with the L2-transfer
    penalty ``λ/2 · Σ (θ − θ_prev)²``; after the task, merge
    ``θ ← (F_t θ_t + F_{<t} θ_prev) / (F_t + F_{<t})`` with ``F_{<t}`` the running sum of
    the earlier tasks' Fishers (= the Fisher-weighted mode of all task models with equal
    α), then ``F_{<t} += F_t``; training continues from the merge.

    Reference: Yujun-Shi/BLIP, ``miniImageNetClassification/src/approaches/imm_mode.py``
    with ``utils.py`` ``fisher_matrix_diag`` (the IMM-mode baseline of the BLIP paper; the
    same as HAT's ``joansj/hat`` ``src/approaches/imm_mode.py``). Followed by default:
    λ = 0.01 times ½ over every parameter, the Fishers summed over tasks, and their
    Fisher (``fisher="reference"``): empirical, true labels, the shuffled training set in
    batches of the training batch size, squared batch-mean-loss gradients times
    ``fisher_scale`` = 20, summed, divided by the number of batches, train mode (as EWC's).
    ``fisher="blip"`` selects BLIP's true Fisher (the default before).

    Deliberate difference, ``merge=True``: the authors' script rebinds the loop variable
    instead of writing the merge into the model, so there it never took effect (and would
    have zeroed entries where both Fishers are zero); ``merge=False`` runs it as they ran
    it (L2 transfer only). Here, where ``F_{<t}`` is zero (e.g. the new task's head,
    future heads) and for parameters without a Fisher the trained value is kept; where
    only ``F_t`` is zero (old heads), the previous value. Not here: their per-step
    gradient-norm clip at 1000 (the trainer's loop). States saved before these conventions
    are refused.
    """

    name = "imm-mode"
    # DDP-safe (README.md, "Distributed"): Fisher sharded + all-reduced; merge of identical tensors
    DISTRIBUTED = None
    HPARAMS: ClassVar[dict[str, Any]] = {
        **QuadraticPenaltyMethod.HPARAMS,
        "lamb": 0.01,  # λ of the L2-transfer penalty (the authors' script default)
        "merge": True,  # the intended mode merge; False: the authors' script as it ran
        "fisher_scale": 20.0,  # the authors' fisher_matrix_diag(sbatch=20) factor
        **FISHER_HPARAMS,
    }
    CONVENTIONS = ("fisher",)

    def __init__(self, model: nn.Module, **hparams: Any) -> None:
        super().__init__(model, **hparams)
        nonneg(self.name, self.hparams, "lamb", "fisher_scale")
        check_fisher_hparams(self)
        self.fisher: Params = {}  # Σ of the finished tasks' Fishers
        self.prev: Params = {}  # merged model after the last task (all parameters)

    @property
    def strength(self) -> float:
        return 0.5 * self.hparams["lamb"]

    def quadratic(self) -> tuple[Params, Params]:
        ones = {n: torch.ones((), device=p.device) for n, p in self.prev.items()}
        return ones, self.prev

    def after_task(self, task: int, sample_x: Tensor, sample_y: Tensor) -> dict[str, Any]:
        if self.hparams["fisher"] == "blip":
            new, stats = task_fisher(self, task, sample_x)
        else:
            new, stats = reference_fisher(self, task, sample_x, sample_y,
                                          scale=self.hparams["fisher_scale"], training=True,
                                          shuffle=True)
        if self.fisher and not self.hparams["merge"]:
            self.fisher = {n: self.fisher[n] + f for n, f in new.items()}
        elif self.fisher:
            with torch.no_grad():
                for n, p in self.model.named_parameters():
                    if n not in new:
                        continue
                    old_f = self.fisher[n]
                    total = new[n] + old_f
                    merged = (new[n] * p + old_f * self.prev[n]) / total.clamp_min(1e-30)
                    # exact where only one side has a Fisher (a head seen by one task)
                    merged = torch.where(new[n] == 0, self.prev[n], merged)
                    p.copy_(torch.where(old_f == 0, p, merged))
            self.fisher = {n: self.fisher[n] + f for n, f in new.items()}
        else:
            self.fisher = new
        self.prev = snapshot(self.model)
        self._changed()
        return {**stats, "merged": task > 0 and self.hparams["merge"]}

    STATE = ("fisher", "prev")
