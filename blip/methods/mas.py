"""``mas``: Memory Aware Synapses, output-sensitivity importances."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .. import distributed, validate
from ..modes import train_mode
from .base import Params, check, nonneg, pos_int, register, seed_ok, snapshot, task_generator
from .importance import output_norm_importance
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


IMPORTANCES = ("reference", "per-sample")


@register
class MAS(QuadraticPenaltyMethod):
    """Memory Aware Synapses (Aljundi et al. 2018) following Avalanche's MAS plugin:
    importance from the gradient of the output's squared L2 norm, ``Ω ← αΩ + (1−α)Ω_t``,
    anchor = θ after the last task, penalty ``λ Σ Ω (θ − θ*)²``.

    Reference: ContinualAI/avalanche, ``avalanche/training/plugins/mas.py``
    (``MASPlugin(lambda_reg=1.0, alpha=0.5)``, itself after FACIL). Followed by default
    (``importance="reference"``, its ``_get_importance``): the experience's training set
    (the end-of-task sample) in order, in batches of the training batch size
    (``train_mb_size``; ``importance_batch_size`` None); per batch the absolute gradient
    of the batch mean of ``‖f(x)‖²`` (the task head's logits), summed, divided by the
    number of batches; model in train mode; every trainable parameter. λ = 1, α = 0.5,
    no ½.

    Selectable: ``importance="per-sample"``, ``mean_n |∂‖f(x_n)‖²/∂θ|`` with exact
    per-sample gradients in eval mode (the paper's definition; the default before, then
    summed over tasks, which ``alpha`` now replaces). The project's default
    ``penalty_step="proximal"`` differs from the plugin's loss term, ``"gradient"``.
    States saved before these conventions are refused.
    """

    name = "mas"
    # DDP-safe (README.md, "Distributed"): the importances are sharded and all-reduced
    DISTRIBUTED = None
    HPARAMS: ClassVar[dict[str, Any]] = {
        **QuadraticPenaltyMethod.HPARAMS,
        "lamb": 1.0,  # λ, lambda_reg (Avalanche's default, the paper's value)
        "alpha": 0.5,  # α, weight of the previous importance (Avalanche's default)
        "importance": "reference",  # "reference" (Avalanche's batched) or "per-sample"
        "importance_batch_size": None,  # None: the run's training batch size (reference)
        "max_samples": None,  # samples used for Ω (None: all the trainer passes, <= 20000)
        "chunk": 64,  # per-sample only: samples per vectorised per-sample-gradient pass
        "seed": None,  # subset draw when max_samples is set; None: torch's global RNG
    }
    CONVENTIONS = ("importance",)

    def __init__(self, model: nn.Module, **hparams: Any) -> None:
        super().__init__(model, **hparams)
        nonneg(self.name, self.hparams, "lamb")
        validate.number("alpha", self.hparams["alpha"], lo=0.0, hi=1.0, where="method 'mas': ")
        check(self.hparams["importance"] in IMPORTANCES,
              f"method 'mas': importance must be one of {IMPORTANCES}; got "
              f"{self.hparams['importance']!r}")
        pos_int(self.name, self.hparams, "chunk")
        for k in ("max_samples", "importance_batch_size"):
            if self.hparams[k] is not None:
                pos_int(self.name, self.hparams, k)
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
        if self.hparams["importance"] == "per-sample":
            new = mas_importance(self.model, x, task, self.hparams["chunk"])
        else:
            batch = self.hparams["importance_batch_size"] or self.run_batch_size()
            new, _ = output_norm_importance(self.model, x, task, batch_size=batch,
                                            training=True)
        a = self.hparams["alpha"]
        self.omega = {n: a * self.omega[n] + (1 - a) * o if n in self.omega else o
                      for n, o in new.items()}
        self.anchor = snapshot(self.model, self.omega)
        self._changed()
        return {"importance_samples": int(x.shape[0])}

    STATE = ("omega", "anchor")
