"""``mas``: Memory Aware Synapses, output-sensitivity importances."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .. import distributed
from ..modes import train_mode
from .base import Params, nonneg, pos_int, register, seed_ok, snapshot, task_generator
from .quadratic import QuadraticPenaltyMethod


def mas_importance(model: nn.Module, x: Tensor, task: int, chunk: int = 64) -> Params:
    """``mean_n |∂‖f(x_n)‖²/∂θ|`` per parameter, with ``f`` the task head's logits:
    exact per-sample gradients (``torch.func``), model in eval mode (per-sample
    gradients are then well defined with BatchNorm/dropout); flags restored. Under
    torch.distributed every rank passes the same ``x`` and sums the rows of its
    :func:`blip.distributed.rows` share; the sums are all-reduced, then divided by ``len(x)``."""
    from torch.func import functional_call, grad, vmap

    if x.shape[0] == 0:
        raise ValueError("mas_importance: x holds no samples")
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    buffers = dict(model.named_buffers())

    def sq_norm(ps: Params, xi: Tensor) -> Tensor:
        out = functional_call(model, (ps, buffers), (xi.unsqueeze(0), task))
        return out.float().pow(2).sum()

    per_sample = vmap(grad(sq_norm), in_dims=(None, 0))
    acc = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    mine = x[distributed.rows(x.shape[0])]  # several ranks: each sums its share of x
    with train_mode(model, False):
        for s in range(0, mine.shape[0], chunk):
            grads = per_sample(params, mine[s:s + chunk])
            for n, g in grads.items():
                acc[n] += g.abs().sum(0)
    distributed.all_reduce_sum_(list(acc.values()))  # identity at world size 1
    return {n: a / x.shape[0] for n, a in acc.items()}


@register
class MAS(QuadraticPenaltyMethod):
    """Memory Aware Synapses (Aljundi et al. 2018): importance
    ``Ω_t = mean_n |∂‖f(x_n)‖²/∂θ|`` over the task's data (per-sample, as the paper),
    summed over tasks; anchor = θ after the last task; penalty ``λ Σ Ω (θ − θ*)²``."""

    name = "mas"
    # DDP-safe (README.md, "Distributed"): the importances are sharded and all-reduced
    DISTRIBUTED = None
    HPARAMS: ClassVar[dict[str, Any]] = {
        **QuadraticPenaltyMethod.HPARAMS,
        "lamb": 1.0,  # λ, penalty strength (the paper's value)
        "max_samples": None,  # samples used for Ω (None: all the trainer passes, <= 20000)
        "chunk": 64,  # samples per vectorised per-sample-gradient pass (memory knob)
        "seed": None,  # subset draw when max_samples is set; None: torch's global RNG
    }

    def __init__(self, model: nn.Module, **hparams: Any) -> None:
        super().__init__(model, **hparams)
        nonneg(self.name, self.hparams, "lamb")
        pos_int(self.name, self.hparams, "chunk")
        if self.hparams["max_samples"] is not None:
            pos_int(self.name, self.hparams, "max_samples")
        seed_ok(self.name, self.hparams)
        self.omega: Params = {}
        self.anchor: Params = {}

    @property
    def strength(self) -> float:
        return self.hparams["lamb"]

    def quadratic(self) -> tuple[Params, Params]:
        return self.omega, self.anchor

    def after_task(self, task: int, sample_x: Tensor, sample_y: Tensor) -> dict[str, Any]:
        m = self.hparams["max_samples"]
        x = sample_x
        if m is not None and x.shape[0] > m:
            idx = torch.randperm(x.shape[0], generator=task_generator(self.hparams["seed"], task))
            x = x[idx[:m].to(x.device)]
        new = mas_importance(self.model, x, task, self.hparams["chunk"])
        self.omega = {n: self.omega[n] + o if n in self.omega else o for n, o in new.items()}
        self.anchor = snapshot(self.model, self.omega)
        self._changed()
        return {"importance_samples": int(x.shape[0])}

    STATE = ("omega", "anchor")
