"""``agem``: Averaged GEM, gradient projection against an episodic memory.

Reference: Avalanche's A-GEM, github.com/ContinualAI/avalanche
``avalanche/training/plugins/agem.py`` (``AGEMPlugin``) with the ``AGEM`` strategy's
default ``sample_size=64`` (``avalanche/training/supervised/strategy_wrappers.py``), the
implementation the field runs. Followed by default: ``mem_per_task`` random samples of each
finished task (its ``patterns_per_experience``; Avalanche has no default, 250 is the
A-GEM paper's MNIST/CIFAR memory); the reference batch is task-balanced,
``ref_batch_size // n_tasks`` samples of each task's memory (its group-balanced loader),
its loss the mean cross-entropy, each sample on its own task's head, in train mode; the
dot product and ``‖g_ref‖²`` run over *every* parameter (old heads' reference gradients
included, the current head's is zero), and the projection is written into every parameter
that has a gradient (with ``zero_grad(set_to_none=True)`` the old heads have none and stay).
Two details differ: we draw each task's share afresh every step (Avalanche cycles through a
shuffled loader), and we take at least one sample per task when there are more tasks than
``ref_batch_size`` (Avalanche's loader would get batch size 0).

``convention="blip"`` is blip's earlier form: the reference batch uniform over the
concatenated memory, dot product, norm and projection over the shared (non-head) parameters
only (its earlier default ``ref_batch_size`` was 256). The saved state (the memory) is the
same for both, so checkpoints of older runs still load.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import distributed
from .base import Method, check, pos_int, register, seed_ok, task_generator


@register
class AGEM(Method):
    """Averaged GEM (Chaudhry et al. 2019), as Avalanche's plugin: an episodic memory of
    ``mem_per_task`` random training samples per finished task; every step, the gradient
    ``g_ref`` of the mean loss on a task-balanced memory batch (each sample on its own
    task's head) is computed and, if ``g·g_ref < 0``,
    ``g ← g − (g·g_ref)/(g_ref·g_ref)·g_ref`` (``convention="blip"``: uniform batch, shared
    parameters only)."""

    name = "agem"
    # DDP-safe (README.md, "Distributed"): rank 0's reference batch, its gradient all-reduced
    DISTRIBUTED = None
    HPARAMS: ClassVar[dict[str, Any]] = {
        **Method.HPARAMS,
        "mem_per_task": 250,  # memory samples per task (A-GEM paper's MNIST/CIFAR memory)
        "ref_batch_size": 64,  # memory samples per reference gradient (Avalanche's sample_size)
        "convention": "avalanche",  # or "blip": blip's earlier batch and projection
        "seed": None,  # memory selection; None: torch's global RNG (trainer-seeded)
    }
    CONVENTIONS = ("avalanche", "blip")

    def __init__(self, model: nn.Module, **hparams: Any) -> None:
        super().__init__(model, **hparams)
        pos_int(self.name, self.hparams, "mem_per_task", "ref_batch_size")
        check(self.hparams["convention"] in self.CONVENTIONS,
              f"method 'agem': convention must be one of {', '.join(self.CONVENTIONS)}; "
              f"got {self.hparams['convention']!r}")
        seed_ok(self.name, self.hparams)
        self.mem_x: list[Tensor] = []
        self.mem_y: list[Tensor] = []
        self.projections = 0  # steps whose gradient was projected (a statistic)
        self.ref_grad: list[Tensor | None] = []  # last g_ref, per projected parameter

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

    def reference_indices(self) -> Tensor:
        """Indices (into the concatenated memory) of this step's reference batch."""
        sizes = [len(y) for y in self.mem_y]
        bs = self.hparams["ref_batch_size"]
        if self.hparams["convention"] == "blip":
            return torch.randperm(sum(sizes))[:bs]
        per_task = max(1, bs // len(sizes))  # Avalanche: batch_size = sample_size // groups
        starts = torch.tensor([0, *sizes]).cumsum(0)
        return torch.cat([starts[k] + torch.randperm(n)[:per_task]
                          for k, n in enumerate(sizes)])

    def projected_parameters(self) -> list[nn.Parameter]:
        """The parameters whose gradients the dot product, the norm and the projection see."""
        if self.hparams["convention"] == "blip":
            return self.shared_parameters()
        return [p for p in self.model.parameters() if p.requires_grad]

    def after_backward(self, task: int) -> None:
        if not self.mem_x:
            return
        params = self.projected_parameters()
        idx = self.reference_indices()
        if distributed.is_distributed():
            ref = self.sharded_reference_gradient(idx, params)
        else:
            with torch.enable_grad():
                ref = torch.autograd.grad(self.memory_loss(self.model, idx), params,
                                          allow_unused=True)
        self.ref_grad = list(ref)
        pairs = [(p, r) for p, r in zip(params, ref, strict=True) if r is not None]
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
                    if self.hparams["convention"] != "blip":
                        continue  # Avalanche writes only into gradients that exist
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
