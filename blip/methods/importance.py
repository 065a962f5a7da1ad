"""Batch-gradient importance estimates of the reference baselines: the BLIP/HAT authors'
empirical Fisher (EWC, IMM-mode), Avalanche's EWC Fisher (online EWC) and Avalanche's MAS
importance. All three are the same loop: one mini-batch at a time, the gradient of the
*batch* loss (not per-sample gradients), a power of its magnitude, summed, scaled, then
divided by the number of batches.

The sums live in accumulators and the division comes last, so the loop shards over
data-parallel ranks: under torch.distributed every rank passes the same sample (and the same
shuffle order), takes a contiguous block of the batches (:func:`blip.distributed.rows` over
the batch count), and the accumulators are all-reduced once before the division. In train
mode, dropout then draws other masks than one process would (the same distribution).
(BLIP's own per-sample true Fisher is :mod:`blip.fisher`; this module does not change it.)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import distributed
from ..modes import train_mode
from .base import Params

#: ``loss(x_batch, y_batch) -> scalar`` whose parameter gradient is measured
BatchLoss = Callable[[Tensor, Tensor], Tensor]


def batch_gradient_importance(model: nn.Module, loss: BatchLoss, x: Tensor, y: Tensor, *,
                              batch_size: int, power: int, scale: float = 1.0,
                              training: bool, order: Tensor | None = None,
                              max_batches: int | None = None) -> tuple[Params, int]:
    """``scale · Σ_b |∇_θ loss(batch b)|^power / n_batches`` for every trainable parameter.

    Batches of ``batch_size`` over ``x[order]`` (``order`` None: the given order; the last
    batch may be short), at most ``max_batches``; the model in train (``training=True``) or
    eval mode, flags restored after. A parameter the loss does not reach gets zeros.
    Returns the estimates and ``n_batches``. ``.grad`` of the parameters is left untouched.
    """
    if x.shape[0] == 0:
        raise ValueError("importance estimate: the end-of-task sample holds no samples")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"importance estimate: x has {x.shape[0]} samples, y {y.shape[0]}")
    idx = torch.arange(x.shape[0]) if order is None else order.cpu()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p for p in model.parameters() if p.requires_grad]
    acc = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    starts = list(range(0, idx.numel(), batch_size))[:max_batches]
    n_batches = len(starts)
    with train_mode(model, training):
        # several ranks: each takes a contiguous block of whole batches (a batch's term is
        # not a sum over its samples), the sums are all-reduced once; one rank: all of them
        for s in starts[distributed.rows(n_batches)]:
            b = idx[s:s + batch_size].to(x.device)
            grads = torch.autograd.grad(loss(x[b], y[b]), params, allow_unused=True)
            for a, g in zip(acc, grads, strict=True):
                if g is not None:
                    a += g.detach().float().abs().pow(power)
    distributed.all_reduce_sum_(acc)
    return {n: a * (scale / n_batches) for n, a in zip(names, acc, strict=True)}, n_batches


def empirical_fisher(model: nn.Module, x: Tensor, y: Tensor, task: int, **kw) -> tuple[
        Params, int]:
    """Squared gradients of the batch-mean cross-entropy with the *true* labels."""
    return batch_gradient_importance(
        model, lambda xb, yb: F.cross_entropy(model(xb, task), yb), x, y, power=2, **kw)


def output_norm_importance(model: nn.Module, x: Tensor, task: int, **kw) -> tuple[
        Params, int]:
    """Absolute gradients of the batch mean of ``‖f(x)‖²`` (the task head's logits)."""
    return batch_gradient_importance(
        model, lambda xb, _: model(xb, task).float().pow(2).sum(1).mean(), x,
        x.new_zeros(x.shape[0]), power=1, **kw)
