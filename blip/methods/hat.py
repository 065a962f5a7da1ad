"""``hat``: Hard Attention to the Task, learned per-task unit gates on the trunk (what the
trunk is, weight decay, BatchNorm: :mod:`blip.methods.trunk`).

Reference: the HAT authors' code, github.com/joansj/hat ``src/approaches/hat.py`` (``Appr``;
the BLIP authors' HAT numbers come from it). Followed by default: ``smax`` 400, ``lamb``
(here ``c``) 0.75, ``thres_cosh`` 50, ``thres_emb`` 6, ``clipgrad`` 10000 (gradient norm over
all parameters, after the compensation); within an epoch ``s = 1/smax + (smax − 1/smax)·i/N``
with ``i`` the first sample of the batch and ``N`` the epoch's samples (so ``s`` never quite
reaches ``smax``); the regulariser ``Σ a_t(1 − a_<t) / Σ(1 − a_<t)`` (``Σ a_t / units`` on
the first task); the embedding-gradient compensation ``smax/s·(cosh(clamp(s·e, ±thres_cosh))
+ 1)/(cosh(e) + 1)``; weight gradients times ``1 − min(a_<t[out], a_<t[in])``, biases times
``1 − a_<t[out]``; and the masks of a finished task soft, ``σ(smax·e)``, at evaluation and
in the cumulative mask ``a_<t = max`` over the finished tasks.

``convention="blip"`` is blip's earlier form: ``s`` linear over the batch index, reaching
``s_max`` on the last batch; the finished tasks' masks binarised (``e > 0``), so what a task
uses is exactly what is protected and its outputs cannot change; no gradient clipping. The
saved state is the same (a checkpoint of an older run lacks ``seen_samples`` and learns it
again in its next epoch), so checkpoints of older runs still load.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import distributed
from ..modes import batchnorm_layers, module_modes, restore_modes
from .base import Method, check, heads, nonneg, pos_int, register, tensor_bytes
from .trunk import (
    Layer,
    add_weight_decay,
    check_task_order,
    layer_units,
    per_unit,
    sgd_without_decay,
    trunk_layers,
)


class _Embeddings(nn.Module):
    """HAT's task embeddings, ``e[t][l]`` one value per output unit of trunk layer ``l``.
    One parameter per (task, layer): the optimizer of task ``t`` holds only ``e[t]``."""

    def __init__(self, n_tasks: int, units: list[int]) -> None:
        super().__init__()
        # N(0, 1): nn.Embedding's init, as the paper's code
        self.e = nn.ModuleList(nn.ParameterList(nn.Parameter(torch.randn(u)) for u in units)
                               for _ in range(n_tasks))


def agreed_links(src: list[int | None]) -> list[int | None]:
    """Under torch.distributed each rank probes the input masks on its own shard of the
    batch; a link is kept only where every rank found it, which is the probe's answer on
    the whole batch (its test is "all zero" over the rows). Identity on one rank."""
    world = distributed.world()[1]
    if world == 1:
        return src
    found = torch.tensor([s is not None for s in src], dtype=torch.int64)
    distributed.all_reduce_sum_([found])
    return [s if int(f) == world else None for s, f in zip(src, found.tolist(), strict=True)]


def global_rows(n: int) -> int:
    """The rows of the whole batch when each rank trains on its share (``rows()``): the
    sum over ranks, so ``s``'s schedule over the epoch's samples is the same on every rank
    and as on one process. ``n`` on one rank: its share's rows (a stand-in row forwarded for an
    empty share is 0 of them, :func:`blip.distributed.counted_rows`)."""
    if distributed.world()[1] == 1:
        return n
    total = torch.tensor([n], dtype=torch.int64)
    distributed.all_reduce_sum_([total])
    return int(total)


@register
class HAT(Method):
    """Hard Attention to the Task (Serrà et al. 2018), as its authors' code (joansj/hat).

    Each trunk layer's output is multiplied by ``a_t = σ(s·e_t)`` per unit/channel
    (forward hooks). Within every epoch ``s`` rises linearly over the batches from
    ``1/s_max`` to ``s_max``. The loss adds ``c · Σ a_t (1 − a_<t) / Σ (1 − a_<t)``
    (sparsity of the new mask where the cumulative mask ``a_<t`` of the finished tasks
    is free). After backward: the embeddings' gradients are compensated
    (``·s_max/s · (cosh(clamp(s·e, ±thres_cosh)) + 1)/(cosh(e) + 1)``), and each trunk
    weight's gradient is multiplied by ``1 − min(a_<t[out], a_<t[in])`` (bias:
    ``1 − a_<t[out]``); after the step the embeddings are clamped to ``±thres_emb``.

    Masks used: at evaluation of task ``t`` (``eval_context``) and in the cumulative
    mask, task ``t``'s mask at ``s_max``: ``σ(s_max·e_t)`` (``convention="blip"``:
    binarised, ``e_t > 0``, so what a finished task uses is exactly what is protected).

    Input-side masks: a layer's input unit ``j`` is taken to be unit ``j`` of the
    previous trunk layer (registration order) only when a probe (on the first
    training batch) shows that gating that layer's units to zero makes exactly those
    inputs zero, with every BatchNorm shifted so that it does not map 0 to 0. Else (the
    first layer, after a residual add or a BatchNorm, conv→linear flatten) the
    conservative output-side mask alone is used: a used unit's whole row is frozen.

    The embeddings are attached to the model by ``prepare()`` as ``model.hat``, so the
    trainer's best-epoch restore and its checkpoints of ``model.state_dict()`` carry
    them (as BLIP's buffers); ``state_dict()`` carries the cumulative masks.

    ``s`` needs the epoch's length: ``batches_per_epoch`` (then ``i/N`` is the batch index
    over it), or (None) the samples of the last epoch, an epoch ending at the next
    ``before_epoch`` or at ``after_task``; until one epoch has been seen, ``s = s_max``
    (hard gates: the weights train while the embeddings barely move; on 3 short pdigits
    tasks this gave 81.6% on the first task vs 47.1% with ``s = 1/s_max`` throughout that
    epoch).
    """

    name = "hat"
    DEFAULTS_REVISION = 2  # its reference's conventions (docs/baselines.md)
    # DDP-safe (README.md, "Distributed"): masks of identical embeddings; probe agreed over ranks
    DISTRIBUTED = None
    HPARAMS: ClassVar[dict[str, Any]] = {
        **Method.HPARAMS,
        "s_max": 400.0,  # s_max, the positive scaling's end value (the paper's)
        "c": 0.75,  # c, attention-mask regulariser strength (the paper's)
        "thres_cosh": 50.0,  # clamp of s·e in the gradient compensation (the paper's code)
        "thres_emb": 6.0,  # embeddings clamped to ±this after each step (the paper's code)
        "clipgrad": 10000.0,  # max gradient norm before each step, 0 = off (the paper's code)
        "batches_per_epoch": None,  # None: counted between before_epoch calls
        "convention": "hat",  # or "blip": blip's earlier schedule and binarised masks
    }
    CONVENTIONS = ("hat", "blip")

    def __init__(self, model: nn.Module, **hparams: Any) -> None:
        super().__init__(model, **hparams)
        hp = self.hparams
        nonneg(self.name, hp, "c", "momentum", "weight_decay")
        for n in ("thres_cosh", "thres_emb"):
            check(isinstance(hp[n], (int, float)) and hp[n] > 0,
                   f"method 'hat': {n} must be a number > 0; got {hp[n]!r}")
        check(isinstance(hp["s_max"], (int, float)) and hp["s_max"] >= 1,
               f"method 'hat': s_max must be a number >= 1; got {hp['s_max']!r}")
        nonneg(self.name, hp, "clipgrad")
        check(hp["convention"] in self.CONVENTIONS,
              f"method 'hat': convention must be one of {', '.join(self.CONVENTIONS)}; "
              f"got {hp['convention']!r}")
        if hp["batches_per_epoch"] is not None:
            pos_int(self.name, hp, "batches_per_epoch")
        self.layers: list[tuple[str, Layer]] = []
        self.emb: _Embeddings | None = None
        self.cum: list[Tensor] = []  # a_<t per layer: max of the finished tasks' masks
        self.in_src: list[int | None] | None = None  # layer feeding each layer's inputs
        self.tasks_done = 0
        self.seen_batches: int | None = None  # batches in the last epoch (learned)
        self.seen_samples: int | None = None  # samples in the last epoch (learned)
        self._batch = 0  # batch index within the current epoch
        self._offset = 0  # samples of the current epoch before this batch
        self._s = 1.0 / hp["s_max"]  # s of the last training batch
        self._task: int | None = None  # the task being trained
        self._eval_task: int | None = None  # inside eval_context(task)
        self._gates: list[Tensor] | None = None  # soft gates of the forward in progress
        self._opt_params: list[nn.Parameter] = []

    # -- setup ---------------------------------------------------------------------------

    def prepare(self) -> nn.Module:
        if self.emb is not None:
            return self.model
        n_tasks = len(heads(self))
        self.layers = trunk_layers(self.model)
        if hasattr(self.model, "hat"):
            raise ValueError("method 'hat': the model already has an attribute `hat`")
        units = [layer_units(m)[0] for _, m in self.layers]
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
        """Task ``task``'s mask per layer once trained: ``σ(s_max·e)``, or binarised
        (``σ(s_max·e) > 0.5``, i.e. ``e > 0``) with ``convention="blip"``."""
        emb = self._embeddings().e[task]
        if self.hparams["convention"] == "blip":
            return [(e.detach() > 0).to(e.dtype) for e in emb]
        return [torch.sigmoid(float(self.hparams["s_max"]) * e.detach()) for e in emb]

    def soft_mask(self, task: int, s: float) -> list[Tensor]:
        return [torch.sigmoid(s * e) for e in self._embeddings().e[task]]

    def scale(self) -> float:
        """``s`` for the next training batch: linear from 1/s_max towards s_max over the
        epoch, at the batch's first sample ``i`` of ``N`` (``convention="blip"``: over the
        batch index, reaching s_max on the last batch)."""
        s_max = float(self.hparams["s_max"])
        n = self.hparams["batches_per_epoch"] or self.seen_batches
        if n is None:
            return s_max
        if self.hparams["convention"] == "blip":
            frac = min(self._batch / (n - 1), 1.0) if n > 1 else 1.0
        elif self.hparams["batches_per_epoch"] is None and self.seen_samples:
            frac = min(self._offset / self.seen_samples, 1.0)
        else:
            frac = min(self._batch / n, 1.0)
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
                    for m in batchnorm_layers(self.model)]
        modes = module_modes(self.model)
        self.model.eval()
        try:
            for i in range(1, len(self.layers)):
                prev, cur = self.layers[i - 1][1], self.layers[i][1]
                if layer_units(prev)[0] != layer_units(cur)[1]:
                    continue
                off = torch.zeros(layer_units(prev)[0], dtype=torch.bool, device=ones[0].device)
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
            restore_modes(modes)
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
        return sgd_without_decay(params, lr, self.hparams["momentum"])

    def before_task(self, task: int) -> None:
        check_task_order(self, task, self.tasks_done)
        check(task < len(self._embeddings().e),
               f"method 'hat': task {task} but the model has {len(self._embeddings().e)} heads")
        self._task, self._batch, self._offset = task, 0, 0
        self._sync()

    def training_loss(self, model: nn.Module, x: Tensor, y: Tensor, task: int) -> Tensor:
        self._task = task
        self._sync()
        if self.in_src is None:
            self.in_src = agreed_links(self._probe_inputs(x, task))
        s = self.scale()
        self._s = s
        self._batch += 1
        # under DDP x is this rank's share (a stand-in row for an empty one counts 0)
        self._offset += global_rows(distributed.counted_rows(int(x.shape[0])))
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
        add_weight_decay(self._opt_params, hp["weight_decay"])
        with torch.no_grad():
            if self.tasks_done:
                self._sync()
                src = self.in_src or [None] * len(self.layers)
                for i, (_, layer) in enumerate(self.layers):
                    out = self.cum[i]
                    w = layer.weight
                    if w.grad is not None:
                        prot = per_unit(out, w, 0)
                        if src[i] is not None:
                            prot = torch.minimum(prot, per_unit(self.cum[src[i]], w, 1))
                        w.grad.mul_(1 - prot)
                    if layer.bias is not None and layer.bias.grad is not None:
                        layer.bias.grad.mul_(1 - out)
            s, s_max, thres = self._s, float(hp["s_max"]), float(hp["thres_cosh"])
            for e in self._embeddings().e[task]:
                if e.grad is not None:
                    num = torch.cosh(torch.clamp(s * e, -thres, thres)) + 1
                    den = torch.cosh(e) + 1
                    e.grad.mul_(s_max / s * num / den)
        if hp["clipgrad"] > 0 and hp["convention"] != "blip":
            # the reference clips over model.parameters(); those without a gradient add nothing
            torch.nn.utils.clip_grad_norm_(
                [p for p in self.model.parameters() if p.grad is not None], hp["clipgrad"])

    def after_step(self, task: int) -> None:
        t = float(self.hparams["thres_emb"])
        with torch.no_grad():
            for e in self._embeddings().e[task]:
                e.clamp_(-t, t)

    def _end_epoch(self) -> None:
        """The epoch in progress (if any batch ran) has ended: learn its length."""
        if self._batch:
            self.seen_batches, self._batch = self._batch, 0
            self.seen_samples, self._offset = self._offset, 0

    def before_epoch(self, task: int, epoch: int) -> None:
        self._end_epoch()

    @contextlib.contextmanager
    def _evaluating(self, task: int) -> Iterator[None]:
        prev, self._eval_task = self._eval_task, task
        try:
            yield
        finally:
            self._eval_task = prev

    def eval_context(self, task: int) -> contextlib.AbstractContextManager[Any]:
        return self._evaluating(task)

    def after_task(self, task: int, sample_x: Tensor, sample_y: Tensor) -> dict[str, Any]:
        check_task_order(self, task, self.tasks_done)
        self._end_epoch()
        self._sync()
        new = self.mask(task)
        used = sum(float((m > 0.5).sum()) for m in new)
        self.cum = [torch.maximum(c, m) for c, m in zip(self.cum, new, strict=True)]
        self.tasks_done = task + 1
        total = sum(c.numel() for c in self.cum)
        return {"units_used_by_task": used / total,
                "units_used_cumulative": sum(float((c > 0.5).sum()) for c in self.cum) / total,
                "input_masks": {self.layers[i][0]: (None if s is None else self.layers[s][0])
                                for i, s in enumerate(self.in_src or [None] * len(self.cum))}}

    # -- state ----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"cum": {n: c for (n, _), c in zip(self.layers, self.cum, strict=True)},
                "tasks_done": self.tasks_done, "seen_batches": self.seen_batches,
                "seen_samples": self.seen_samples}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._embeddings()
        names = [n for n, _ in self.layers]
        if sorted(state["cum"]) != sorted(names):
            raise ValueError(f"load_state_dict: 'cum' names layers {sorted(state['cum'])}, the "
                             f"model's trunk has {sorted(names)}")
        cum = []
        for n, layer in self.layers:
            c = state["cum"][n]
            if c.shape != (layer_units(layer)[0],):
                raise ValueError(f"load_state_dict: cum[{n!r}] has shape {tuple(c.shape)}; the "
                                 f"layer has {layer_units(layer)[0]} output units")
            cum.append(c.detach().clone().to(layer.weight.device, layer.weight.dtype))
        # validated and converted first, assigned last: a rejected state changes nothing
        tasks_done, seen = int(state["tasks_done"]), state.get("seen_batches")
        seen_batches = None if seen is None else int(seen)
        samples = state.get("seen_samples")  # absent in checkpoints of older runs
        seen_samples = None if samples is None else int(samples)
        self.cum, self.tasks_done, self.seen_batches = cum, tasks_done, seen_batches
        self.seen_samples = seen_samples

    def extra_state_bytes(self) -> int:
        # the embeddings live in the model (its parameters) but are HAT's overhead too
        return tensor_bytes(self.state_dict()) + tensor_bytes(list(self._embeddings().parameters()))
