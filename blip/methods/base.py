"""Continual-learning methods as classes with hooks; the trainer knows nothing else.

Trainer protocol, per run::

    method = make_method(name, model, **hparams)
    model = method.prepare()                      # before building anything on the model
    for task in range(T):
        method.before_task(task)
        opt = method.make_optimizer(task, lr)     # the trainer may later set param_groups' lr
        ... per batch:
            loss = method.training_loss(model, x, y, task)   # task loss + any penalty
            opt.zero_grad(); loss.backward()
            method.after_backward(task)                      # e.g. project or mask grads
            opt.step(); method.after_step(task)
        ... per evaluation of a task u (each epoch's validation; after after_task, the tests):
            with method.eval_context(u):             # e.g. apply task u's mask
                logits = model(x, u)
        stats = method.after_task(task, train_x, train_y)
    method.state_dict() / load_state_dict()       # beside model.state_dict() in checkpoints

To add a method: subclass :class:`Method`, set ``name`` and ``HPARAMS`` (the accepted
hyper-parameters with defaults), decorate with :func:`register`.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .nn import quantized_layers
from .optim import ConstrainedSGD
from .strategy import BLIP


def tensor_bytes(obj: Any) -> int:
    """Total bytes of the tensors in a (nested) dict / list / tuple."""
    if isinstance(obj, Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


class Method:
    """Base class: plain SGD over all parameters, no hooks."""

    name: ClassVar[str] = "base"
    #: accepted hyper-parameters and their defaults; others are a TypeError
    HPARAMS: ClassVar[dict[str, Any]] = {"momentum": 0.0, "weight_decay": 0.0}

    def __init__(self, model: nn.Module, **hparams: Any) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module; got {type(model).__name__}")
        unknown = set(hparams) - set(self.HPARAMS)
        if unknown:
            raise TypeError(f"method {self.name!r} got unknown hyper-parameters "
                            f"{sorted(unknown)}; accepted: {sorted(self.HPARAMS)}")
        self.model = model
        self.hparams: dict[str, Any] = {**self.HPARAMS, **hparams}

    def prepare(self) -> nn.Module:
        """Return the model to train (possibly converted in place). Call once, first."""
        return self.model

    def trainable_parameters(self, task: int) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def make_optimizer(self, task: int, lr: float) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.trainable_parameters(task), lr=lr,
                               momentum=self.hparams["momentum"],
                               weight_decay=self.hparams["weight_decay"])

    def before_task(self, task: int) -> None:
        pass

    def training_loss(self, model: nn.Module, x: Tensor, y: Tensor, task: int) -> Tensor:
        """The loss to minimise on a batch of task ``task``: cross-entropy on its head."""
        return F.cross_entropy(model(x, task), y)

    def after_backward(self, task: int) -> None:
        """Called between ``loss.backward()`` and ``optimizer.step()``."""

    def after_step(self, task: int) -> None:
        pass

    def after_task(self, task: int, train_x: Tensor, train_y: Tensor) -> dict[str, Any]:
        return {}

    def eval_context(self, task: int) -> contextlib.AbstractContextManager[Any]:
        """Entered around the forward passes that evaluate task ``task``."""
        return contextlib.nullcontext()

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def layer_capacity(self) -> dict[str, float] | None:
        """Used capacity per quantized layer (section 8), or None if not applicable."""
        return None

    def extra_state_bytes(self) -> int:
        """Bytes the method keeps beyond the model's parameters: its state's tensors."""
        return tensor_bytes(self.state_dict())

    def bits_histograms(self) -> dict[str, list[int]] | None:
        """Per quantized layer, counts of parameters with 0..max_bit frozen bits."""
        return None


METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    if cls.name in METHODS:
        raise ValueError(f"a method named {cls.name!r} is already registered")
    METHODS[cls.name] = cls
    return cls


def make_method(name: str, model: nn.Module, **hparams: Any) -> Method:
    try:
        cls = METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(METHODS)}") from None
    return cls(model, **hparams)


@register
class Finetune(Method):
    """Plain SGD on everything: the forgetting baseline."""

    name = "finetune"


@register
class Freeze(Method):
    """Train everything on task 0, then only the current task's head (trunk frozen,
    BatchNorm running statistics included)."""

    name = "freeze"

    def _heads(self) -> nn.ModuleList:
        heads = getattr(self.model, "heads", None)
        if not isinstance(heads, nn.ModuleList):
            raise ValueError("method 'freeze' needs a model with a `heads` nn.ModuleList")
        return heads

    def prepare(self) -> nn.Module:
        self._heads()
        return self.model

    def trainable_parameters(self, task: int) -> list[nn.Parameter]:
        if task == 0:
            return list(self.model.parameters())
        return list(self._heads()[task].parameters())

    def before_task(self, task: int) -> None:
        if task == 0:
            return
        head_ids = {id(p) for p in self._heads().parameters()}
        for p in self.model.parameters():
            if id(p) not in head_ids:
                p.requires_grad_(False)
        for m in self.model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.momentum = 0.0  # running stats stay as task 0 left them


@register
class BLIPMethod(Method):
    """BLIP: fused constrained SGD during the task, Fisher -> bits -> sync after it."""

    name = "blip"
    HPARAMS: ClassVar[dict[str, Any]] = {
        **Method.HPARAMS,
        "max_bit": 20,
        "F_prior": 1e-15,
        "forward_mode": "continuous",
        "exclude": ("heads",),
        "fisher_batches": 80,
        "fisher_batch_size": 100,
        "seed": 0,  # Fisher sampling uses its own generator: resumable, global RNG untouched
    }

    def __init__(self, model: nn.Module, **hparams: Any) -> None:
        super().__init__(model, **hparams)
        self.strategy: BLIP | None = None

    def prepare(self) -> nn.Module:
        if self.strategy is None:
            hp = self.hparams
            self.strategy = BLIP(
                self.model, max_bit=hp["max_bit"], F_prior=hp["F_prior"], exclude=hp["exclude"],
                forward_mode=hp["forward_mode"], n_batches=hp["fisher_batches"],
                batch_size=hp["fisher_batch_size"],
            )
        return self.model

    def _blip(self) -> BLIP:
        if self.strategy is None:
            raise RuntimeError("call prepare() before using the 'blip' method")
        return self.strategy

    def make_optimizer(self, task: int, lr: float) -> torch.optim.Optimizer:
        return ConstrainedSGD(self.trainable_parameters(task), lr,
                              momentum=self.hparams["momentum"],
                              weight_decay=self.hparams["weight_decay"], model=self._blip().model)

    def after_task(self, task: int, train_x: Tensor, train_y: Tensor) -> dict[str, Any]:
        t0 = time.perf_counter()
        # CPU generator on any device: the draw is then identical on CPU and CUDA runs.
        gen = torch.Generator().manual_seed(int(self.hparams["seed"]) * 100003 + task)
        stats = self._blip().end_task(task, (train_x, train_y), generator=gen)
        stats["bits_histogram"] = self.bits_histograms()
        stats["end_task_seconds"] = time.perf_counter() - t0
        return stats

    def state_dict(self) -> dict[str, Any]:
        # The BLIP buffers live in model.state_dict(), which the trainer saves anyway.
        return self._blip().state_dict(include_model=False)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._blip().load_state_dict(state)

    def layer_capacity(self) -> dict[str, float] | None:
        return self._blip().capacity()["layers"]

    def extra_state_bytes(self) -> int:
        # The BLIP state lives in the quantized layers' buffers (prev, bits, F_old).
        buffers = [b for _, layer in quantized_layers(self.model)
                   for name, b in layer.named_buffers(recurse=False)
                   if name.startswith(("prev_", "bits_", "fisher_old_"))]
        return super().extra_state_bytes() + tensor_bytes(buffers)

    def bits_histograms(self) -> dict[str, list[int]] | None:
        out: dict[str, list[int]] = {}
        for name, layer in quantized_layers(self._blip().model):
            counts = sum(
                torch.bincount(c.bits.flatten().long(), minlength=layer.max_bit + 1)
                for _, c in layer.constraints()
            )
            out[name] = [int(v) for v in counts.tolist()]
        return out


__all__ = ["BLIPMethod", "Finetune", "Freeze", "METHODS", "Method", "make_method", "register"]

# Registers the baseline methods (ewc, online-ewc, si, mas, imm-mode, lwf, agem); last,
# because blip.baselines imports Method and register from here.
from . import baselines as _baselines  # noqa: E402,F401
from . import isolation as _isolation  # noqa: E402,F401  (hat, packnet)
