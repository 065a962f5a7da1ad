"""Parameter-isolation baselines: HAT and PackNet, on the same hooks as BLIP.

Registered names: ``hat``, ``packnet``. Both act on the *trunk*: every ``nn.Linear`` /
``nn.Conv2d`` of the model that is not under ``model.heads`` (the per-task heads are
trained only by their own task's loss, so they need no protection). Both evaluate
task ``t`` through :meth:`Method.eval_context`, which the trainer enters around every
evaluation, with task ``t``'s own mask.

HAT (Serrà et al. 2018): a learnable embedding ``e_t`` per task and trunk layer gates
that layer's output units/channels by ``a_t = σ(s·e_t)`` (forward hooks, so any model
works). See :class:`HAT`.

PackNet (Mallya & Lazebnik 2018): every trunk weight is owned by one task or free;
a task trains only free weights, then releases (prunes to zero) a fixed fraction of
them, retrains the rest briefly and takes ownership. See :class:`PackNet`.

Weight decay: both build plain SGD *without* weight decay and add ``weight_decay·θ``
to the gradients in ``after_backward`` before masking them, so neither weight decay
nor momentum (whose buffer only ever sees the masked, zero gradient; a fresh
optimizer is made per task) can move a protected weight: it stays bit-identical.

BatchNorm (ResNet-18): HAT leaves the running statistics shared across tasks, as the
other baselines do (the HAT paper's nets had no BatchNorm), so a BatchNorm net can
still drift; PackNet freezes them after the first task, as its paper does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# blip.methods imports this module at its end, possibly while blip.baselines is still
# initialising (when baselines was imported first): bind the module, not its names.
from . import baselines as _bl
from .methods import Method, register, tensor_bytes

Layer = nn.Linear | nn.Conv2d


# -- helpers ------------------------------------------------------------------------------


def _heads(method: Method) -> nn.ModuleList:
    heads = getattr(method.model, "heads", None)
    if not isinstance(heads, nn.ModuleList):
        raise ValueError(f"method {method.name!r} needs a model with a `heads` nn.ModuleList "
                         "(one head per task)")
    return heads


def trunk_layers(model: nn.Module) -> list[tuple[str, Layer]]:
    """The ``nn.Linear`` / ``nn.Conv2d`` modules outside ``model.heads``, in registration
    order (quantized subclasses included)."""
    out = [(n, m) for n, m in model.named_modules()
           if isinstance(m, (nn.Linear, nn.Conv2d)) and n != "heads"
           and not n.startswith("heads.")]
    if not out:
        raise ValueError("the model has no nn.Linear/nn.Conv2d layers outside `heads`")
    return out


def _units(layer: Layer) -> tuple[int, int]:
    """(output units, input units) of a layer; input 0 when a unit mask cannot index the
    weight's input dimension (grouped convolutions)."""
    if isinstance(layer, nn.Linear):
        return layer.out_features, layer.in_features
    return layer.out_channels, layer.in_channels if layer.groups == 1 else 0


def _sgd(params: list[nn.Parameter], lr: float, momentum: float) -> torch.optim.Optimizer:
    # weight decay is added to the gradients before they are masked (see the module doc)
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=0.0)


def _add_weight_decay(params: list[nn.Parameter], wd: float) -> None:
    if wd:
        for p in params:
            if p.grad is not None:
                p.grad.add_(p.detach(), alpha=wd)


def _per_unit(mask: Tensor, weight: Tensor, dim: int) -> Tensor:
    """``mask`` (one value per unit of ``weight``'s dimension ``dim``) shaped to broadcast."""
    shape = [1] * weight.dim()
    shape[dim] = -1
    return mask.view(shape)


def _check_task_order(method: Method, task: int, done: int) -> None:
    _bl._check(isinstance(task, int) and task >= done,
           f"method {method.name!r}: task {task!r} comes after {done} finished tasks; tasks "
           f"must run in order from 0 (a finished task cannot be trained again)")


# -- HAT ------------------------------------------------------------------------------------


class _Embeddings(nn.Module):
    """HAT's task embeddings, ``e[t][l]`` one value per output unit of trunk layer ``l``.
    One parameter per (task, layer): the optimizer of task ``t`` holds only ``e[t]``."""

    def __init__(self, n_tasks: int, units: list[int]) -> None:
        super().__init__()
        # N(0, 1): nn.Embedding's init, as the paper's code
        self.e = nn.ModuleList(nn.ParameterList(nn.Parameter(torch.randn(u)) for u in units)
                               for _ in range(n_tasks))


@register
class HAT(Method):
    """Hard Attention to the Task (Serrà et al. 2018).

    Each trunk layer's output is multiplied by ``a_t = σ(s·e_t)`` per unit/channel
    (forward hooks). Within every epoch ``s`` rises linearly over the batches from
    ``1/s_max`` to ``s_max``. The loss adds ``c · Σ a_t (1 − a_<t) / Σ (1 − a_<t)``
    (sparsity of the new mask where the cumulative mask ``a_<t`` of the finished tasks
    is free). After backward: the embeddings' gradients are compensated
    (``·s_max/s · (cosh(clamp(s·e, ±thres_cosh)) + 1)/(cosh(e) + 1)``), and each trunk
    weight's gradient is multiplied by ``1 − min(a_<t[out], a_<t[in])`` (bias:
    ``1 − a_<t[out]``); after the step the embeddings are clamped to ``±thres_emb``.

    Masks used: at evaluation of task ``t`` (``eval_context``) and in the cumulative
    mask, task ``t``'s mask at ``s_max`` *binarised* (``e_t > 0``), so what a finished
    task uses is exactly what is protected and its outputs cannot change.

    Input-side masks: a layer's input unit ``j`` is taken to be unit ``j`` of the
    previous trunk layer (registration order) only when a probe (on the first
    training batch) shows that gating that layer's units to zero makes exactly those
    inputs zero, with every BatchNorm shifted so that it does not map 0 to 0. Else (the
    first layer, after a residual add or a BatchNorm, conv→linear flatten) the
    conservative output-side mask alone is used: a used unit's whole row is frozen.

    The embeddings are attached to the model by ``prepare()`` as ``model.hat``, so the
    trainer's best-epoch restore and its checkpoints of ``model.state_dict()`` carry
    them (as BLIP's buffers); ``state_dict()`` carries the cumulative masks.

    ``s`` needs the number of batches per epoch: ``batches_per_epoch``, or (None) the
    count of the last epoch, an epoch ending when the trainer evaluates
    (``eval_context``); until one epoch has been seen, ``s = s_max`` (hard gates: the
    weights train while the embeddings barely move; on 3 short pdigits tasks this gave
    81.6% on the first task vs 47.1% with ``s = 1/s_max`` throughout that epoch).
    """

    name = "hat"
    HPARAMS: ClassVar[dict[str, Any]] = {
        **Method.HPARAMS,
        "s_max": 400.0,  # s_max, the positive scaling's end value (the paper's)
        "c": 0.75,  # c, attention-mask regulariser strength (the paper's)
        "thres_cosh": 50.0,  # clamp of s·e in the gradient compensation (the paper's code)
        "thres_emb": 6.0,  # embeddings clamped to ±this after each step (the paper's code)
        "batches_per_epoch": None,  # None: counted between the trainer's evaluations
    }

    def __init__(self, model: nn.Module, **hparams: Any) -> None:
        super().__init__(model, **hparams)
        hp = self.hparams
        _bl._nonneg(self.name, hp, "c", "momentum", "weight_decay")
        for n in ("thres_cosh", "thres_emb"):
            _bl._check(isinstance(hp[n], (int, float)) and hp[n] > 0,
                   f"method 'hat': {n} must be a number > 0; got {hp[n]!r}")
        _bl._check(isinstance(hp["s_max"], (int, float)) and hp["s_max"] >= 1,
               f"method 'hat': s_max must be a number >= 1; got {hp['s_max']!r}")
        if hp["batches_per_epoch"] is not None:
            _bl._pos_int(self.name, hp, "batches_per_epoch")
        self.layers: list[tuple[str, Layer]] = []
        self.emb: _Embeddings | None = None
        self.cum: list[Tensor] = []  # a_<t per layer: max of the finished tasks' masks
        self.in_src: list[int | None] | None = None  # layer feeding each layer's inputs
        self.tasks_done = 0
        self.seen_batches: int | None = None  # batches in the last epoch (learned)
        self._batch = 0  # batch index within the current epoch
        self._s = 1.0 / hp["s_max"]  # s of the last training batch
        self._task: int | None = None  # the task being trained
        self._eval_task: int | None = None  # inside eval_context(task)
        self._gates: list[Tensor] | None = None  # soft gates of the forward in progress
        self._opt_params: list[nn.Parameter] = []

    # -- setup ---------------------------------------------------------------------------

    def prepare(self) -> nn.Module:
        if self.emb is not None:
            return self.model
        n_tasks = len(_heads(self))
        self.layers = trunk_layers(self.model)
        if hasattr(self.model, "hat"):
            raise ValueError("method 'hat': the model already has an attribute `hat`")
        units = [_units(m)[0] for _, m in self.layers]
        self.emb = _Embeddings(n_tasks, units).to(self.layers[0][1].weight.device)
        self.model.add_module("hat", self.emb)
        self.cum = [torch.zeros(u) for u in units]
        for i, (_, layer) in enumerate(self.layers):
            layer.register_forward_hook(self._hook(i))
        return self.model

    def _embeddings(self) -> _Embeddings:
        if self.emb is None:
            raise RuntimeError("call prepare() before using the 'hat' method")
        return self.emb

    def _sync(self) -> None:
        """Keep the cumulative masks on the weights' device (prepare() runs before .to())."""
        for i, (_, layer) in enumerate(self.layers):
            w = layer.weight
            if self.cum[i].device != w.device or self.cum[i].dtype != w.dtype:
                self.cum[i] = self.cum[i].to(w.device, w.dtype)

    def _hook(self, i: int):
        conv = isinstance(self.layers[i][1], nn.Conv2d)

        def hook(module: nn.Module, inputs: Any, output: Tensor) -> Tensor:
            g = self.gate(i)
            if g is None:
                return output
            # Linear: units on the last dim; Conv2d: channels before (H, W)
            return output * (g.view(-1, 1, 1) if conv else g)

        return hook

    def gate(self, i: int) -> Tensor | None:
        """Layer ``i``'s gate for the forward in progress: the soft training gate, else the
        binarised mask of the evaluated (or last trained) task, else none."""
        if self._gates is not None:
            return self._gates[i]
        task = self._eval_task if self._eval_task is not None else self._task
        return None if task is None else self.mask(task)[i]

    def mask(self, task: int) -> list[Tensor]:
        """Task ``task``'s binarised mask per layer: ``σ(s_max·e) > 0.5``, i.e. ``e > 0``."""
        emb = self._embeddings().e[task]
        return [(e.detach() > 0).to(e.dtype) for e in emb]

    def soft_mask(self, task: int, s: float) -> list[Tensor]:
        return [torch.sigmoid(s * e) for e in self._embeddings().e[task]]

    def scale(self) -> float:
        """``s`` for the next training batch: linear from 1/s_max to s_max over the epoch."""
        s_max = float(self.hparams["s_max"])
        n = self.hparams["batches_per_epoch"] or self.seen_batches
        if n is None:
            return s_max
        frac = min(self._batch / (n - 1), 1.0) if n > 1 else 1.0
        return 1.0 / s_max + (s_max - 1.0 / s_max) * frac

    # -- input-side masks ------------------------------------------------------------------

    @torch.no_grad()
    def _probe_inputs(self, x: Tensor, task: int) -> list[int | None]:
        """For each layer, the previous trunk layer if its input unit ``j`` is zero whenever
        that layer's unit ``j`` is gated to zero (checked on ``x``), else None."""
        src: list[int | None] = [None] * len(self.layers)
        ones = [torch.ones_like(e) for e in self._embeddings().e[task]]
        # a BatchNorm maps 0 to −mean/std ≠ 0 once it has running statistics: make it so now
        bn_hooks = [m.register_forward_hook(lambda _m, _i, out: out + 1.0)
                    for m in self.model.modules()
                    if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        modes = {m: m.training for m in self.model.modules()}
        self.model.eval()
        try:
            for i in range(1, len(self.layers)):
                prev, cur = self.layers[i - 1][1], self.layers[i][1]
                if _units(prev)[0] != _units(cur)[1]:
                    continue
                off = torch.zeros(_units(prev)[0], dtype=torch.bool, device=ones[0].device)
                off[::2] = True
                self._gates = list(ones)
                self._gates[i - 1] = (~off).to(ones[i - 1].dtype)
                seen: list[Tensor] = []
                h = cur.register_forward_pre_hook(lambda _m, inp, seen=seen: seen.append(inp[0]))
                try:
                    self.model(x, task)
                finally:
                    h.remove()
                if len(seen) == 1:
                    inp = seen[0]
                    sel = inp[..., off] if isinstance(cur, nn.Linear) else inp[:, off]
                    if bool((sel == 0).all()):
                        src[i] = i - 1
        finally:
            self._gates = None
            for h in bn_hooks:
                h.remove()
            for m, flag in modes.items():
                m.training = flag
        return src

    # -- training -------------------------------------------------------------------------

    def trainable_parameters(self, task: int) -> list[nn.Parameter]:
        emb = self._embeddings()
        others = {id(p) for t, es in enumerate(emb.e) if t != task for p in es}
        return [p for p in self.model.parameters() if p.requires_grad and id(p) not in others]

    def make_optimizer(self, task: int, lr: float) -> torch.optim.Optimizer:
        emb_ids = {id(p) for p in self._embeddings().parameters()}
        params = self.trainable_parameters(task)
        self._opt_params = [p for p in params if id(p) not in emb_ids]  # weight-decayed
        return _sgd(params, lr, self.hparams["momentum"])

    def before_task(self, task: int) -> None:
        _check_task_order(self, task, self.tasks_done)
        _bl._check(task < len(self._embeddings().e),
               f"method 'hat': task {task} but the model has {len(self._embeddings().e)} heads")
        self._task, self._batch = task, 0
        self._sync()

    def training_loss(self, model: nn.Module, x: Tensor, y: Tensor, task: int) -> Tensor:
        self._task = task
        self._sync()
        if self.in_src is None:
            self.in_src = self._probe_inputs(x, task)
        s = self.scale()
        self._s = s
        self._batch += 1
        gates = self.soft_mask(task, s)
        self._gates = gates
        try:
            out = model(x, task)
        finally:
            self._gates = None
        num = sum(((g * (1 - c)).sum() for g, c in zip(gates, self.cum, strict=True)),
                  torch.zeros((), device=x.device))
        den = sum(float((1 - c).sum()) for c in self.cum)
        reg = num / den if den > 0 else num * 0.0
        return F.cross_entropy(out, y) + self.hparams["c"] * reg

    def after_backward(self, task: int) -> None:
        hp = self.hparams
        _add_weight_decay(self._opt_params, hp["weight_decay"])
        with torch.no_grad():
            if self.tasks_done:
                self._sync()
                src = self.in_src or [None] * len(self.layers)
                for i, (_, layer) in enumerate(self.layers):
                    out = self.cum[i]
                    w = layer.weight
                    if w.grad is not None:
                        prot = _per_unit(out, w, 0)
                        if src[i] is not None:
                            prot = torch.minimum(prot, _per_unit(self.cum[src[i]], w, 1))
                        w.grad.mul_(1 - prot)
                    if layer.bias is not None and layer.bias.grad is not None:
                        layer.bias.grad.mul_(1 - out)
            s, s_max, thres = self._s, float(hp["s_max"]), float(hp["thres_cosh"])
            for e in self._embeddings().e[task]:
                if e.grad is not None:
                    num = torch.cosh(torch.clamp(s * e, -thres, thres)) + 1
                    den = torch.cosh(e) + 1
                    e.grad.mul_(s_max / s * num / den)

    def after_step(self, task: int) -> None:
        t = float(self.hparams["thres_emb"])
        with torch.no_grad():
            for e in self._embeddings().e[task]:
                e.clamp_(-t, t)

    @contextlib.contextmanager
    def _evaluating(self, task: int) -> Iterator[None]:
        if self._batch:  # the trainer evaluates after every epoch: one has just ended
            self.seen_batches, self._batch = self._batch, 0
        prev, self._eval_task = self._eval_task, task
        try:
            yield
        finally:
            self._eval_task = prev

    def eval_context(self, task: int) -> contextlib.AbstractContextManager[Any]:
        return self._evaluating(task)

    def after_task(self, task: int, train_x: Tensor, train_y: Tensor) -> dict[str, Any]:
        _check_task_order(self, task, self.tasks_done)
        self._sync()
        new = self.mask(task)
        used = sum(float(m.sum()) for m in new)
        self.cum = [torch.maximum(c, m) for c, m in zip(self.cum, new, strict=True)]
        self.tasks_done = task + 1
        total = sum(c.numel() for c in self.cum)
        return {"units_used_by_task": used / total,
                "units_used_cumulative": sum(float(c.sum()) for c in self.cum) / total,
                "input_masks": {self.layers[i][0]: (None if s is None else self.layers[s][0])
                                for i, s in enumerate(self.in_src or [None] * len(self.cum))}}

    # -- state ----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"cum": {n: c for (n, _), c in zip(self.layers, self.cum, strict=True)},
                "tasks_done": self.tasks_done, "seen_batches": self.seen_batches}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._embeddings()
        names = [n for n, _ in self.layers]
        if sorted(state["cum"]) != sorted(names):
            raise ValueError(f"load_state_dict: 'cum' names layers {sorted(state['cum'])}, the "
                             f"model's trunk has {sorted(names)}")
        cum = []
        for n, layer in self.layers:
            c = state["cum"][n]
            if c.shape != (_units(layer)[0],):
                raise ValueError(f"load_state_dict: cum[{n!r}] has shape {tuple(c.shape)}; the "
                                 f"layer has {_units(layer)[0]} output units")
            cum.append(c.detach().clone().to(layer.weight.device, layer.weight.dtype))
        self.cum = cum
        self.tasks_done = int(state["tasks_done"])
        seen = state.get("seen_batches")
        self.seen_batches = None if seen is None else int(seen)

    def extra_state_bytes(self) -> int:
        # the embeddings live in the model (its parameters) but are HAT's overhead too
        return tensor_bytes(self.state_dict()) + tensor_bytes(list(self._embeddings().parameters()))


# -- PackNet --------------------------------------------------------------------------------


@register
class PackNet(Method):
    """PackNet (Mallya & Lazebnik 2018).

    ``owner`` (uint8, one per trunk weight): 0 = free, ``k`` = owned by task ``k − 1``.
    While task ``t`` trains, every weight is used but only free ones are updated
    (gradients of owned weights zeroed after backward; see the module doc for weight
    decay and momentum). After it (``after_task``): in each trunk layer the fraction
    ``prune`` of the free weights with the smallest magnitude is released (set to 0,
    left free); the kept ones are retrained alone for ``retrain_epochs`` epochs (plain
    SGD, ``retrain_lr``, batches of ``retrain_batch_size``, on the data the trainer
    passes to ``after_task``: the task's training set, or a seeded subset of 20000 samples
    of a larger one) and become owned by task ``t``. Evaluating task ``u``
    (``eval_context``) uses only the weights owned by tasks ``<= u`` (the others are
    zeroed for the forward and restored after it).

    Biases, and any other trunk parameter (e.g. BatchNorm affine), are trained on the
    first task and frozen after it, and BatchNorm running statistics stop updating
    after it: the paper's choice. Heads are never pruned.

    ``prune`` default 0.75 (the paper prunes 50-75% per task): with a fixed fraction ``p``
    task ``t`` gets ``(1 − p)·p^t`` of each layer, so ``p = 0.5`` leaves the 10th task
    ``0.2%``; ``0.75`` gives it ``1.9%`` (and ``7.5%`` is left free for it to train).
    On the 10 pdigits tasks (preset, seed 0) prune 0.5 / 0.75 / 0.9 gave ACC 96.07 /
    96.30 / 95.52 (BWT 0 each): the small MLP's later tasks lean on the frozen
    weights of the earlier ones, so capacity matters little there; 0.75 keeps room for
    longer streams.
    """

    name = "packnet"
    HPARAMS: ClassVar[dict[str, Any]] = {
        **Method.HPARAMS,
        "prune": 0.75,  # fraction of each layer's free weights released after every task
        "retrain_epochs": 2,  # post-pruning retraining (the paper: 10 on ImageNet; small nets)
        "retrain_lr": 0.01,  # plain-SGD lr of that retraining
        "retrain_batch_size": 64,
        "seed": None,  # retraining's shuffling; None: torch's global RNG (trainer-seeded)
    }

    def __init__(self, model: nn.Module, **hparams: Any) -> None:
        super().__init__(model, **hparams)
        hp = self.hparams
        _bl._nonneg(self.name, hp, "momentum", "weight_decay")
        _bl._check(isinstance(hp["prune"], (int, float)) and 0 <= hp["prune"] < 1,
               f"method 'packnet': prune must be a number in [0, 1); got {hp['prune']!r}")
        _bl._check(isinstance(hp["retrain_epochs"], int) and hp["retrain_epochs"] >= 0,
               f"method 'packnet': retrain_epochs must be an int >= 0; "
               f"got {hp['retrain_epochs']!r}")
        _bl._check(isinstance(hp["retrain_lr"], (int, float)) and hp["retrain_lr"] > 0,
               f"method 'packnet': retrain_lr must be a number > 0; got {hp['retrain_lr']!r}")
        _bl._pos_int(self.name, hp, "retrain_batch_size")
        _bl._seed_ok(self.name, hp)
        self.layers: list[tuple[str, Layer]] = []
        self.owners: list[Tensor] = []
        self.tasks_done = 0
        self._opt_params: list[nn.Parameter] = []

    def prepare(self) -> nn.Module:
        if not self.layers:
            _heads(self)
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
        keep = {id(m.weight) for _, m in self.layers} | {id(p) for p in _heads(self).parameters()}
        return [p for p in self.model.parameters() if p.requires_grad and id(p) in keep]

    def make_optimizer(self, task: int, lr: float) -> torch.optim.Optimizer:
        self._opt_params = self.trainable_parameters(task)
        return _sgd(self._opt_params, lr, self.hparams["momentum"])

    def before_task(self, task: int) -> None:
        _check_task_order(self, task, self.tasks_done)
        _bl._check(task < 255, f"method 'packnet': at most 255 tasks (uint8 owners); got {task}")
        self._sync()
        if task > 0:
            for m in self.model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.momentum = 0.0  # running statistics stay as the first task left them

    def after_backward(self, task: int) -> None:
        _add_weight_decay(self._opt_params, self.hparams["weight_decay"])
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

    @torch.no_grad()
    def release(self, task: int) -> list[Tensor]:
        """Prune: per layer, zero the ``prune`` fraction of the free weights with the smallest
        magnitude (ties: lowest index first); returns the kept free weights' masks."""
        keep = []
        for (_, layer), own in zip(self.layers, self.owners, strict=True):
            w = layer.weight
            free = (own == 0).flatten().nonzero().squeeze(1)
            k = int(round(self.hparams["prune"] * free.numel()))
            order = torch.argsort(w.detach().flatten()[free].abs(), stable=True)
            released = free[order[:k]]
            w.view(-1)[released] = 0.0
            kept = torch.zeros(w.numel(), dtype=torch.bool, device=w.device)
            kept[free[order[k:]]] = True
            keep.append(kept.view_as(w))
        return keep

    def _retrain(self, task: int, keep: list[Tensor], x: Tensor, y: Tensor) -> int:
        hp = self.hparams
        params = self.trainable_parameters(task)
        opt = torch.optim.SGD(params, lr=hp["retrain_lr"])
        gen = _bl._generator(hp["seed"], task)
        bs, n, steps = hp["retrain_batch_size"], x.shape[0], 0
        modes = {m: m.training for m in self.model.modules()}
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
            for m, flag in modes.items():
                m.training = flag
        return steps

    def after_task(self, task: int, train_x: Tensor, train_y: Tensor) -> dict[str, Any]:
        _check_task_order(self, task, self.tasks_done)
        self._sync()
        keep = self.release(task)
        steps = self._retrain(task, keep, train_x, train_y) if train_x.shape[0] else 0
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
        self.owners = owners
        self.tasks_done = int(state["tasks_done"])


__all__ = ["HAT", "PackNet", "trunk_layers"]
