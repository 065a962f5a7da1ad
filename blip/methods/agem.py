"""``agem``: Averaged GEM, gradient projection against an episodic memory."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import distributed
from .base import Method, pos_int, register, seed_ok, task_generator


@register
class AGEM(Method):
    """Averaged GEM (Chaudhry et al. 2019): an episodic memory of ``mem_per_task``
    random training samples per finished task; every step, the gradient ``g_ref`` of
    the mean loss on a random memory batch (each sample on its own task's head, model
    in the trainer's mode) is computed and, if ``g·g_ref < 0``,
    ``g ← g − (g·g_ref)/(g_ref·g_ref)·g_ref`` over the shared (non-head) parameters.
    Heads are left as the task loss set them (the memory never reaches the current
    head, and projecting old heads would move them without their task's loss)."""

    name = "agem"
    # DDP-safe (README.md, "Distributed"): rank 0's reference batch, its gradient all-reduced
    DISTRIBUTED = None
    HPARAMS: ClassVar[dict[str, Any]] = {
        **Method.HPARAMS,
        "mem_per_task": 250,  # episodic memory samples kept per task (the paper's MNIST/CIFAR)
        "ref_batch_size": 256,  # memory samples per reference gradient (the paper's value)
        "seed": None,  # memory selection; None: torch's global RNG (trainer-seeded)
    }

    def __init__(self, model: nn.Module, **hparams: Any) -> None:
        super().__init__(model, **hparams)
        pos_int(self.name, self.hparams, "mem_per_task", "ref_batch_size")
        seed_ok(self.name, self.hparams)
        self.mem_x: list[Tensor] = []
        self.mem_y: list[Tensor] = []
        self.projections = 0  # steps whose gradient was projected (a statistic)
        self.ref_grad: list[Tensor | None] = []  # last g_ref, per shared parameter

    def shared_parameters(self) -> list[nn.Parameter]:
        heads = getattr(self.model, "heads", None)
        head_ids = {id(p) for p in heads.parameters()} if isinstance(heads, nn.Module) else set()
        return [p for p in self.model.parameters() if p.requires_grad and id(p) not in head_ids]

    def memory_loss(self, model: nn.Module, idx: Tensor | None = None) -> Tensor:
        """Mean cross-entropy over memory samples ``idx`` (of the concatenated memory)."""
        x, y = torch.cat(self.mem_x), torch.cat(self.mem_y)
        t = torch.cat([torch.full((len(m),), k, dtype=torch.long)
                       for k, m in enumerate(self.mem_y)])
        if idx is not None:
            x, y, t = x[idx.to(x.device)], y[idx.to(y.device)], t[idx]
        total = torch.zeros((), device=x.device)
        for k in t.unique().tolist():
            sel = t == k
            logits = model(x[sel.to(x.device)], k)
            total = total + F.cross_entropy(logits, y[sel.to(y.device)], reduction="sum")
        return total / len(t)

    def after_backward(self, task: int) -> None:
        if not self.mem_x:
            return
        n_mem = sum(len(y) for y in self.mem_y)
        idx = torch.randperm(n_mem)[: self.hparams["ref_batch_size"]]
        shared = self.shared_parameters()
        if distributed.is_distributed():
            ref = self.sharded_reference_gradient(idx, shared)
        else:
            with torch.enable_grad():
                ref = torch.autograd.grad(self.memory_loss(self.model, idx), shared,
                                          allow_unused=True)
        self.ref_grad = list(ref)
        pairs = [(p, r) for p, r in zip(shared, ref, strict=True) if r is not None]
        if not pairs:
            return
        with torch.no_grad():
            dot = sum(((p.grad * r).sum() for p, r in pairs if p.grad is not None),
                      torch.zeros((), device=pairs[0][1].device))
            if dot >= 0:
                return
            rr = sum((r * r).sum() for _, r in pairs)
            alpha = dot / rr
            for p, r in pairs:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                p.grad.sub_(alpha * r)
        self.projections += 1

    def sharded_reference_gradient(self, idx: Tensor,
                                   shared: list[nn.Parameter]) -> tuple[Tensor, ...]:
        """``g_ref`` on several ranks: rank 0's draw of the reference batch (each rank's
        global RNG has been advanced by its own shard's dropout), each rank's share of it
        (:func:`blip.distributed.rows`) weighted by share / batch, summed over ranks. So
        every rank projects onto the same ``g_ref``, the batch-mean gradient of one process
        (dropout masks aside). Unused parameters get a zero ``g_ref``."""
        distributed.broadcast_([idx], src=0)
        mine = idx[distributed.rows(idx.numel())]
        ref: list[Tensor | None] = [None] * len(shared)
        if mine.numel():
            with torch.enable_grad():
                loss = self.memory_loss(self.model, mine) * (mine.numel() / idx.numel())
                ref = list(torch.autograd.grad(loss, shared, allow_unused=True))
        out = tuple(torch.zeros_like(p) if r is None else r for p, r in zip(shared, ref,
                                                                             strict=True))
        distributed.all_reduce_sum_(out)
        return out

    def after_task(self, task: int, sample_x: Tensor, sample_y: Tensor) -> dict[str, Any]:
        if len(self.mem_x) != task:
            raise RuntimeError(f"method 'agem': memory holds {len(self.mem_x)} tasks at the "
                               f"end of task {task}; tasks must run in order from 0")
        m = min(self.hparams["mem_per_task"], sample_x.shape[0])
        gen = task_generator(self.hparams["seed"], task)
        idx = torch.randperm(sample_x.shape[0], generator=gen)[:m]
        self.mem_x.append(sample_x[idx.to(sample_x.device)].detach().clone())
        self.mem_y.append(sample_y[idx.to(sample_y.device)].detach().clone())
        stats = {"memory_samples": sum(len(y) for y in self.mem_y),
                 "projected_steps": self.projections}
        self.projections = 0
        return stats

    def state_dict(self) -> dict[str, Any]:
        return {"mem_x": self.mem_x, "mem_y": self.mem_y}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["mem_x"]) != len(state["mem_y"]):
            raise ValueError("load_state_dict: 'mem_x' and 'mem_y' differ in length")
        device = next(self.model.parameters()).device
        self.mem_x = [x.detach().clone().to(device) for x in state["mem_x"]]
        self.mem_y = [y.detach().clone().to(device) for y in state["mem_y"]]
