"""``packnet``: PackNet, per-task ownership of pruned trunk weights (what the trunk is,
weight decay, BatchNorm: :mod:`blip.methods.trunk`).

Reference: the PackNet authors' code, github.com/arunmallya/packnet: ``src/prune.py``
(``SparsePruner``), ``src/main.py`` and the task-sequence scripts ``src/scripts/
run_sequence.sh`` / ``run_all_sequence.sh``. Followed by default: per trunk layer, the
fraction ``prune`` = 0.75 of the weights trained for the task (the free ones) is released,
every weight whose magnitude is at most the ``round(prune·n)``-th smallest (their
``kthvalue`` cut-off: ties at the cut-off go too); the last task of the model (its last
head) is not pruned (their ``0.75,0.75,-1``); the kept weights are retrained for 10 epochs
(``--post_prune_epochs 10``) with SGD momentum 0.9 (``Manager.prune``), batches of 32
(``--batch_size`` default), at a tenth of the task's lr (``--lr 1e-4`` after training at
``1e-3``); biases and BatchNorm are trained on the first task only (their ``nobias-nobn``
runs). Not followed: their post-pruning run keeps the epoch of best test accuracy; ours
keeps the last epoch.

blip's previous convention (2 retraining epochs at lr 0.01, no momentum, batches of 64,
every task pruned, exactly ``round(prune·n)`` weights released) is ``retrain_epochs=2,
retrain_lr=0.01, retrain_momentum=0, retrain_batch_size=64, prune_last=True`` (ties at the
cut-off aside); the saved state is the same, so checkpoints of older runs still load.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import validate
from ..modes import freeze_batchnorm_stats, module_modes, restore_modes
from .base import Method, check, heads, nonneg, pos_int, register, seed_ok, task_generator
from .trunk import Layer, add_weight_decay, check_task_order, sgd_without_decay, trunk_layers


@register
class PackNet(Method):
    """PackNet (Mallya & Lazebnik 2018), as its authors' code (arunmallya/packnet).

    ``owner`` (uint8, one per trunk weight): 0 = free, ``k`` = owned by task ``k − 1``.
    While task ``t`` trains, every weight is used but only free ones are updated
    (gradients of owned weights zeroed after backward; see blip.methods.trunk for weight
    decay and momentum). After it (``after_task``): in each trunk layer the fraction
    ``prune`` of the free weights with the smallest magnitude is released (set to 0,
    left free; not on the model's last task unless ``prune_last``); the kept ones are
    retrained alone for ``retrain_epochs`` epochs (SGD with ``retrain_momentum`` at
    ``retrain_lr``, batches of ``retrain_batch_size``, on the data the trainer
    passes to ``after_task``: the task's training set, or a seeded subset of 20000 samples
    of a larger one) and become owned by task ``t``. Evaluating task ``u``
    (``eval_context``) uses only the weights owned by tasks ``<= u`` (the others are
    zeroed for the forward and restored after it).

    Biases, and any other trunk parameter (e.g. BatchNorm affine), are trained on the
    first task and frozen after it, and BatchNorm running statistics stop updating
    after it: the paper's choice. Heads are never pruned.

    ``prune`` default 0.75 (the reference's task sequence; the paper prunes 50-75% per
    task): with a fixed fraction ``p`` task ``t`` gets ``(1 − p)·p^t`` of each layer, so
    ``p = 0.5`` leaves the 10th task ``0.2%``; ``0.75`` gives it ``1.9%`` (and ``7.5%`` is
    left free for it to train; by default the last task is not pruned and keeps it all).
    On the 10 pdigits tasks (preset, seed 0, blip's earlier retraining) prune 0.5 / 0.75 /
    0.9 gave ACC 96.07 / 96.30 / 95.52 (BWT 0 each): the small MLP's later tasks lean on the frozen
    weights of the earlier ones, so capacity matters little there; 0.75 keeps room for
    longer streams.
    """

    name = "packnet"
    # DDP-safe (README.md, "Distributed"): prunes identical weights; same retraining everywhere
    DISTRIBUTED = None
    HPARAMS: ClassVar[dict[str, Any]] = {
        **Method.HPARAMS,
        "prune": 0.75,  # fraction of each layer's free weights released (reference: 0.75)
        "prune_last": False,  # prune the model's last task too (reference: -1, it is not)
        "retrain_epochs": 10,  # post-pruning retraining epochs (reference: 10)
        "retrain_lr": None,  # None: 0.1 x the task's lr (reference: 1e-4 after 1e-3)
        "retrain_momentum": 0.9,  # SGD momentum of the retraining (reference: 0.9)
        "retrain_batch_size": 32,  # (reference: --batch_size default 32)
        "seed": None,  # retraining's shuffling; None: torch's global RNG (trainer-seeded)
    }

    def __init__(self, model: nn.Module, **hparams: Any) -> None:
        super().__init__(model, **hparams)
        hp = self.hparams
        nonneg(self.name, hp, "momentum", "weight_decay")
        check(isinstance(hp["prune"], (int, float)) and 0 <= hp["prune"] < 1,
               f"method 'packnet': prune must be a number in [0, 1); got {hp['prune']!r}")
        check(isinstance(hp["retrain_epochs"], int) and hp["retrain_epochs"] >= 0,
               f"method 'packnet': retrain_epochs must be an int >= 0; "
               f"got {hp['retrain_epochs']!r}")
        if hp["retrain_lr"] is not None:  # None: 0.1 x the task's lr
            validate.number("retrain_lr", hp["retrain_lr"], lo=0.0, lo_open=True,
                            where="method 'packnet': ")
        check(isinstance(hp["retrain_momentum"], (int, float))
              and 0 <= hp["retrain_momentum"] < 1,
              f"method 'packnet': retrain_momentum must be a number in [0, 1); "
              f"got {hp['retrain_momentum']!r}")
        check(isinstance(hp["prune_last"], bool),
              f"method 'packnet': prune_last must be True or False; got {hp['prune_last']!r}")
        pos_int(self.name, hp, "retrain_batch_size")
        seed_ok(self.name, hp)
        self.layers: list[tuple[str, Layer]] = []
        self.owners: list[Tensor] = []
        self.tasks_done = 0
        self._opt_params: list[nn.Parameter] = []
        self._lr: float | None = None  # the task's initial lr (make_optimizer)

    def prepare(self) -> nn.Module:
        if not self.layers:
            heads(self)
            self.layers = trunk_layers(self.model)
            self.owners = [torch.zeros(m.weight.shape, dtype=torch.uint8)
                           for _, m in self.layers]
        return self.model

    def _sync(self) -> None:
        if not self.layers:
            raise RuntimeError("call prepare() before using the 'packnet' method")
        for i, (_, layer) in enumerate(self.layers):
            if self.owners[i].device != layer.weight.device:
                self.owners[i] = self.owners[i].to(layer.weight.device)

    def trainable_parameters(self, task: int) -> list[nn.Parameter]:
        self._sync()
        if task == 0:
            return [p for p in self.model.parameters() if p.requires_grad]
        # after the first task: the trunk weights (free entries) and the heads only
        keep = {id(m.weight) for _, m in self.layers} | {id(p) for p in heads(self).parameters()}
        return [p for p in self.model.parameters() if p.requires_grad and id(p) in keep]

    def make_optimizer(self, task: int, lr: float) -> torch.optim.Optimizer:
        self._opt_params = self.trainable_parameters(task)
        self._lr = float(lr)
        return sgd_without_decay(self._opt_params, lr, self.hparams["momentum"])

    def before_task(self, task: int) -> None:
        check_task_order(self, task, self.tasks_done)
        check(task < 255, f"method 'packnet': at most 255 tasks (uint8 owners); got {task}")
        self._sync()
        if task > 0:
            freeze_batchnorm_stats(self.model)  # they stay as the first task left them

    def after_backward(self, task: int) -> None:
        add_weight_decay(self._opt_params, self.hparams["weight_decay"])
        with torch.no_grad():
            for (_, layer), own in zip(self.layers, self.owners, strict=True):
                if layer.weight.grad is not None:
                    layer.weight.grad.masked_fill_(own != 0, 0.0)

    @contextlib.contextmanager
    def _only_owned_by(self, task: int) -> Iterator[None]:
        """Weights not owned by tasks ``<= task`` are zeroed inside, restored on exit."""
        self._sync()
        saved = []
        with torch.no_grad():
            for (_, layer), own in zip(self.layers, self.owners, strict=True):
                w = layer.weight
                saved.append(w.detach().clone())
                w.masked_fill_((own == 0) | (own > task + 1), 0.0)
        try:
            yield
        finally:
            with torch.no_grad():
                for (_, layer), w in zip(self.layers, saved, strict=True):
                    layer.weight.copy_(w)

    def eval_context(self, task: int) -> contextlib.AbstractContextManager[Any]:
        if task >= self.tasks_done:  # the task in training: every weight is its own or older
            return contextlib.nullcontext()
        return self._only_owned_by(task)

    def prunes(self, task: int) -> bool:
        """Whether task ``task`` is pruned: all but the model's last, unless ``prune_last``."""
        return self.hparams["prune_last"] or task < len(heads(self)) - 1

    @torch.no_grad()
    def release(self, task: int) -> list[Tensor]:
        """Prune: per layer, with ``k = round(prune · free)``, zero every free weight whose
        magnitude is at most the k-th smallest (the reference's cut-off; none when k = 0);
        returns the kept free weights' masks."""
        keep = []
        for (_, layer), own in zip(self.layers, self.owners, strict=True):
            w = layer.weight
            free = own == 0
            k = int(round(self.hparams["prune"] * int(free.sum()))) if self.prunes(task) else 0
            released = torch.zeros_like(free)
            if k > 0:
                mags = w.detach().abs()
                cutoff = torch.kthvalue(mags[free].float().cpu(), k).values.to(w.device)
                released = free & (mags <= cutoff)
            w[released] = 0.0
            keep.append(free & ~released)
        return keep

    def _retrain(self, task: int, keep: list[Tensor], x: Tensor, y: Tensor) -> int:
        hp = self.hparams
        params = self.trainable_parameters(task)
        lr = hp["retrain_lr"]
        if lr is None:
            if self._lr is None:
                raise RuntimeError("method 'packnet': retrain_lr=None retrains at 0.1 x the "
                                   "task's lr, but make_optimizer was not called for the task")
            lr = 0.1 * self._lr
        opt = torch.optim.SGD(params, lr=lr, momentum=hp["retrain_momentum"])
        gen = task_generator(hp["seed"], task)
        bs, n, steps = hp["retrain_batch_size"], x.shape[0], 0
        modes = module_modes(self.model)
        self.model.train()
        try:
            for _ in range(hp["retrain_epochs"]):
                perm = torch.randperm(n, generator=gen).to(x.device)
                for i in range(0, n, bs):
                    idx = perm[i:i + bs]
                    loss = F.cross_entropy(self.model(x[idx], task), y[idx])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    with torch.no_grad():
                        for (_, layer), k in zip(self.layers, keep, strict=True):
                            if layer.weight.grad is not None:
                                layer.weight.grad.mul_(k)
                    opt.step()
                    steps += 1
        finally:
            restore_modes(modes)
        return steps

    def after_task(self, task: int, sample_x: Tensor, sample_y: Tensor) -> dict[str, Any]:
        check_task_order(self, task, self.tasks_done)
        self._sync()
        keep = self.release(task)
        steps = (self._retrain(task, keep, sample_x, sample_y)
                 if sample_x.shape[0] and self.prunes(task) else 0)
        for own, k in zip(self.owners, keep, strict=True):
            own[k] = task + 1
        self.tasks_done = task + 1
        return {"retrain_steps": steps,
                "owned_by_task": {n: float((o == task + 1).float().mean())
                                  for (n, _), o in zip(self.layers, self.owners, strict=True)},
                "free": {n: float((o == 0).float().mean())
                         for (n, _), o in zip(self.layers, self.owners, strict=True)}}

    def state_dict(self) -> dict[str, Any]:
        return {"owners": {f"{n}.weight": o for (n, _), o in zip(self.layers, self.owners,
                                                                 strict=True)},
                "tasks_done": self.tasks_done}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._sync()
        names = [f"{n}.weight" for n, _ in self.layers]
        if sorted(state["owners"]) != sorted(names):
            raise ValueError(f"load_state_dict: 'owners' names {sorted(state['owners'])}, the "
                             f"model's trunk weights are {sorted(names)}")
        owners = []
        for n, (_, layer) in zip(names, self.layers, strict=True):
            o = state["owners"][n]
            if o.shape != layer.weight.shape or o.dtype != torch.uint8:
                raise ValueError(f"load_state_dict: owners[{n!r}] must be uint8 of shape "
                                 f"{tuple(layer.weight.shape)}; got {o.dtype} "
                                 f"{tuple(o.shape)}")
            owners.append(o.detach().clone().to(layer.weight.device))
        self.owners, self.tasks_done = owners, int(state["tasks_done"])
