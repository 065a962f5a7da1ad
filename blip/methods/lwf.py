"""``lwf``: Learning without Forgetting, distillation of the earlier heads.

Reference: the BLIP authors' LwF baseline, github.com/Yujun-Shi/BLIP (commit 975e6dbc),
``miniImageNetClassification/src/approaches/lwf.py`` with its ``cross_entropy`` in
``approaches/utils.py``: the implementation the paper's tables compare against (itself
HAT's, joansj/hat ``src/approaches/lwf.py``). Followed by default: λ = 2, T = 1, the
distillation of every earlier head of a frozen copy taken after the previous task (eval
mode) on the current batch, softmaxes raised to ``1/T`` and renormalised (that is
``softmax(logits/T)``), the student's probabilities smoothed by ``eps = 1e-5`` spread over
the classes, batch mean, no ``T²`` factor, and the gradient norm clipped at 100 over all
trained parameters before each step.

Not followed (trainer concerns): their validation loss for the lr schedule and best epoch
includes the distillation term; blip's is the task's cross-entropy. blip's previous
convention (λ 1, T 2, no smoothing, no clipping) is ``lamb=1, T=2, eps=0, clipgrad=0``;
the saved state is the same, so checkpoints of older runs still load.
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models import MultiHead
from .base import Method, check, nonneg, register


def head_logits(model: nn.Module, x: Tensor, tasks: list[int]) -> list[Tensor]:
    """Logits of several heads on one batch: the trunk runs once on a MultiHead (one
    dropout mask for all heads), otherwise ``model(x, k)`` per head."""
    if isinstance(model, MultiHead):
        h = model.features(x)
        return [model.heads[k](h) for k in tasks]
    return [model(x, k) for k in tasks]



def distillation_loss(new_logits: Tensor, old_logits: Tensor, T: float,
                      eps: float = 0.0) -> Tensor:
    """Li & Hoiem's modified cross-entropy, batch mean: ``−Σ q·log p`` with
    ``q = softmax(old/T)`` and ``p = (softmax(new/T) + eps/C) / (1 + eps)`` (``C``
    classes; the reference's smoothing keeps ``log p`` finite). ``eps = 0``: plain
    ``log softmax(new/T)``, computed stably."""
    target = F.softmax(old_logits.float() / T, dim=1)
    if eps == 0:
        logp = F.log_softmax(new_logits.float() / T, dim=1)
    else:
        p = F.softmax(new_logits.float() / T, dim=1)
        logp = torch.log((p + eps / p.shape[1]) / (1 + eps))
    return -(target * logp).sum(1).mean()


@register
class LwF(Method):
    """Learning without Forgetting (Li & Hoiem 2016), as the BLIP authors' baseline: on
    task ``t``, cross-entropy on head ``t`` plus ``λ · Σ_{k<t}`` distillation of head ``k``
    towards a frozen copy of the model taken after task ``t−1`` (eval mode), on the current
    batch; gradient norm clipped at ``clipgrad``. The paper's warm-up (training the new head
    alone first) is not done, as in the reference."""

    name = "lwf"
    # DDP-safe (README.md, "Distributed"): the old model copies identical weights
    DISTRIBUTED = None
    HPARAMS: ClassVar[dict[str, Any]] = {
        **Method.HPARAMS,
        "lamb": 2.0,  # λ, weight of the distillation terms (reference: lamb=2, its grid's best)
        "T": 1.0,  # distillation temperature (reference: T=1, its grid's best)
        "eps": 1e-5,  # smoothing of the student's probabilities (reference: eps=1e-5)
        "clipgrad": 100.0,  # max gradient norm before each step, 0 = off (reference: 100)
    }

    def __init__(self, model: nn.Module, **hparams: Any) -> None:
        super().__init__(model, **hparams)
        nonneg(self.name, self.hparams, "lamb", "eps", "clipgrad")
        check(isinstance(self.hparams["T"], (int, float)) and self.hparams["T"] > 0,
               f"method 'lwf': T must be a number > 0; got {self.hparams['T']!r}")
        self.old_model: nn.Module | None = None
        self.old_tasks = 0  # heads 0..old_tasks-1 are distilled

    def _freeze_copy(self) -> nn.Module:
        old = copy.deepcopy(self.model).eval()
        for p in old.parameters():
            p.requires_grad_(False)
        return old

    @torch.no_grad()
    def distillation_targets(self, x: Tensor, task: int) -> list[Tensor]:
        """The old model's logits of every earlier head on ``x`` (empty on task 0)."""
        if self.old_model is None:
            return []
        return head_logits(self.old_model, x, list(range(min(task, self.old_tasks))))

    def training_loss(self, model: nn.Module, x: Tensor, y: Tensor, task: int) -> Tensor:
        targets = self.distillation_targets(x, task)
        outs = head_logits(model, x, list(range(len(targets))) + [task])
        loss = F.cross_entropy(outs[-1], y)
        if targets:
            dist = sum(distillation_loss(o, t, self.hparams["T"], self.hparams["eps"])
                       for o, t in zip(outs[:-1], targets, strict=True))
            loss = loss + self.hparams["lamb"] * dist
        return loss

    def after_backward(self, task: int) -> None:
        # the reference clips over model.parameters(); those without a gradient add nothing
        if self.hparams["clipgrad"] > 0:
            torch.nn.utils.clip_grad_norm_(
                [p for p in self.model.parameters() if p.grad is not None],
                self.hparams["clipgrad"])

    def after_task(self, task: int, sample_x: Tensor, sample_y: Tensor) -> dict[str, Any]:
        self.old_model = self._freeze_copy()
        self.old_tasks = task + 1
        return {}

    def state_dict(self) -> dict[str, Any]:
        old = None if self.old_model is None else self.old_model.state_dict()
        return {"old_model": old, "old_tasks": self.old_tasks}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        old_tasks = int(state["old_tasks"])
        old_model = None
        if state["old_model"] is not None:
            old_model = self._freeze_copy()
            old_model.load_state_dict(state["old_model"])
        self.old_tasks, self.old_model = old_tasks, old_model
