"""Continual-learning methods as classes with hooks; the trainer knows nothing else.

Trainer protocol, per run (the method never sees the trainer)::

    method = make_method(name, model, **hparams)
    model = method.prepare()                      # before building anything on the model
    for task in range(T):
        method.before_task(task)
        opt = method.make_optimizer(task, lr)     # the trainer may later set param_groups' lr
        for epoch in ...:
            method.before_epoch(task, epoch)
            ... per batch:
                loss = method.training_loss(model, x, y, task)   # task loss + any penalty
                opt.zero_grad(); loss.backward()
                method.after_backward(task)                      # e.g. project or mask grads
                opt.step(); method.after_step(task)
            ... per evaluation of a task u (each epoch's validation; after after_task, tests):
                with method.eval_context(u):             # e.g. apply task u's mask
                    logits = model(x, u)
        stats = method.after_task(task, sample_x, sample_y)  # the task's end-of-task sample
        method.bits_histograms(), method.layer_capacity()   # per-task statistics, if any
    method.state_dict() / load_state_dict()       # beside model.state_dict() in checkpoints

To add a method: one file in this package, a :class:`Method` subclass with ``name`` and
``HPARAMS`` (the accepted hyper-parameters with defaults) decorated with :func:`register`,
and its import in ``__init__.py`` (see README.md here).

Randomness: a method's ``seed`` hyper-parameter seeds its own CPU generators per task
(:func:`task_generator`); with ``seed=None`` its draws come from torch's global RNG,
which the trainer re-seeds from ``(run seed, task)`` before every task, so runs are
reproducible and resumable either way.
"""

from __future__ import annotations

import contextlib
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import validate


def tensor_bytes(obj: Any) -> int:
    """Total bytes of the tensors in a (nested) dict / list / tuple."""
    if isinstance(obj, Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def named_tensors(obj: Any, prefix: str = "") -> dict[str, Tensor]:
    """The tensors in a (nested) dict / list / tuple, keyed by their dotted path."""
    if isinstance(obj, Tensor):
        return {prefix: obj}
    items = (obj.items() if isinstance(obj, dict)
             else enumerate(obj) if isinstance(obj, (list, tuple)) else ())
    out: dict[str, Tensor] = {}
    for k, v in items:
        out.update(named_tensors(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


class Method:
    """Base class: plain SGD over all parameters, no hooks."""

    name: ClassVar[str] = "base"
    #: accepted hyper-parameters and their defaults; others are a TypeError
    HPARAMS: ClassVar[dict[str, Any]] = {"momentum": 0.0, "weight_decay": 0.0}
    #: True: the ``seed`` hyper-parameter defaults to the run's seed (the trainer passes it)
    SEED_FROM_RUN: ClassVar[bool] = False
    #: None: correct under DistributedDataParallel (README.md here, "Distributed"); else the
    #: one-line reason it refuses to run on several ranks. Every registered method sets its own.
    DISTRIBUTED: ClassVar[str | None] = None
    #: bumped when the defaults (HPARAMS) change meaning: a run directory written before it
    #: recorded its resolved hyper-parameters is then neither resumed nor reused by compare
    #: (revision 2: the reference conventions of docs/baselines.md)
    DEFAULTS_REVISION: ClassVar[int] = 1
    #: named variants, ``"<name>:<variant>"`` to the trainer and compare: each one set of
    #: this method's hyper-parameters, its defaults in place of HPARAMS' (method_class)
    VARIANTS: ClassVar[dict[str, dict[str, Any]]] = {}
    #: on a variant's class: its settings (a benchmark preset does not override them)
    VARIANT_SETTINGS: ClassVar[dict[str, Any]] = {}

    def __init__(self, model: nn.Module, **hparams: Any) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module; got {type(model).__name__}")
        unknown = set(hparams) - set(self.HPARAMS)
        if unknown:
            raise TypeError(f"method {self.name!r} got unknown hyper-parameters "
                            f"{sorted(unknown)}; accepted: {sorted(self.HPARAMS)}")
        self.model = model
        self.hparams: dict[str, Any] = {**self.HPARAMS, **hparams}
        # types, float32 finiteness, momentum/weight_decay ranges; subclasses add ranges
        validate.check_hparams(self.name, self.HPARAMS, self.hparams)

    def prepare(self) -> nn.Module:
        """Return the model to train (possibly converted in place). Call once, first."""
        return self.model

    def trainable_parameters(self, task: int) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def make_optimizer(self, task: int, lr: float) -> torch.optim.Optimizer:
        validate.number("lr", lr, lo=0.0)  # finite in float32: torch's SGD would take 1e39
        return torch.optim.SGD(self.trainable_parameters(task), lr=lr,
                               momentum=self.hparams["momentum"],
                               weight_decay=self.hparams["weight_decay"])

    def before_task(self, task: int) -> None:
        pass

    def before_epoch(self, task: int, epoch: int) -> None:
        """Called before each pass over task ``task``'s training data."""

    def training_loss(self, model: nn.Module, x: Tensor, y: Tensor, task: int) -> Tensor:
        """The loss to minimise on a batch of task ``task``: cross-entropy on its head."""
        return F.cross_entropy(model(x, task), y)

    def after_backward(self, task: int) -> None:
        """Called between ``loss.backward()`` and ``optimizer.step()``."""

    def after_step(self, task: int) -> None:
        pass

    def after_task(self, task: int, sample_x: Tensor, sample_y: Tensor) -> dict[str, Any]:
        """End of task ``task``; ``sample_x``/``sample_y`` is its end-of-task sample (its training
        set, or a seeded subset of a large one, as model inputs). Returns JSON-able stats."""
        return {}

    def eval_context(self, task: int) -> contextlib.AbstractContextManager[Any]:
        """Entered around the forward passes that evaluate task ``task``."""
        return contextlib.nullcontext()

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def distributed_state(self) -> dict[str, Tensor]:
        """The tensors that must be bitwise identical on every rank after a task (the
        trainer's end-of-task checksum, :func:`blip.distributed.check_identical`): by
        default every tensor in :meth:`state_dict`, named by its path there."""
        return named_tensors(self.state_dict())

    def layer_capacity(self) -> dict[str, float] | None:
        """Used capacity per quantized layer and ``"overall"`` (docs/semantics.md, section 8),
        or None if not applicable."""
        return None

    def extra_state_bytes(self) -> int:
        """Bytes the method keeps beyond the model's parameters: its state's tensors."""
        return tensor_bytes(self.state_dict())

    def bits_histograms(self) -> dict[str, list[int]] | None:
        """Per quantized layer, counts of parameters with 0..max_bit frozen bits."""
        return None


METHODS: dict[str, type[Method]] = {}


def add_unique(registry: dict[str, Any], cls: Any, kind: str = "method") -> Any:
    """``registry[cls.name] = cls``; a second class of the same name is an error."""
    if cls.name in registry:
        raise ValueError(f"a {kind} named {cls.name!r} is already registered")
    registry[cls.name] = cls
    return cls


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make the method available by its ``name`` (``make_method``)."""
    return add_unique(METHODS, cls)


_VARIANT_CLASSES: dict[str, type[Method]] = {}


def method_names() -> list[str]:
    """Every name the trainer accepts: the registered methods and their named variants."""
    return [*METHODS, *(f"{m}:{v}" for m, cls in METHODS.items() for v in cls.VARIANTS)]


def method_class(name: str) -> type[Method]:
    """The method registered as ``name``; ``"<method>:<variant>"``: that method with the
    variant's hyper-parameters as its defaults (a subclass named so, made once)."""
    base, colon, variant = name.partition(":") if isinstance(name, str) else (name, "", "")
    cls = METHODS.get(base)
    if cls is None or (colon and variant not in cls.VARIANTS):
        raise ValueError(f"unknown method {name!r}; choose one of {method_names()}")
    if not variant:
        return cls
    if name not in _VARIANT_CLASSES:
        settings = cls.VARIANTS[variant]
        _VARIANT_CLASSES[name] = type(f"{cls.__name__}_{variant}", (cls,), {
            "name": name, "HPARAMS": {**cls.HPARAMS, **settings},
            "VARIANT_SETTINGS": dict(settings),
            "__doc__": f"{base} with {settings} (the {variant!r} variant; see {base}).",
            "__module__": cls.__module__})
    return _VARIANT_CLASSES[name]


def make_method(name: str, model: nn.Module, **hparams: Any) -> Method:
    return method_class(name)(model, **hparams)


def check_distributed(cls: type[Method], world_size: int) -> None:
    """A ValueError naming the method and its reason if it refuses ``world_size`` > 1 ranks
    (the trainer calls it before any work)."""
    reason = cls.DISTRIBUTED
    if world_size > 1 and reason is not None:
        raise ValueError(f"method {cls.name!r} cannot train on {world_size} ranks "
                         f"(torch.distributed): {reason}")


# -- helpers shared by the methods ---------------------------------------------------------

Params = dict[str, Tensor]


def check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def nonneg(method: str, hp: dict[str, Any], *names: str) -> None:
    for n in names:  # finite in float32, not a bool (blip.validate)
        validate.number(n, hp[n], lo=0.0, where=f"method {method!r}: ")


def pos_int(method: str, hp: dict[str, Any], *names: str) -> None:
    for n in names:
        validate.number(n, hp[n], lo=1, integer=True, where=f"method {method!r}: ")


def seed_ok(method: str, hp: dict[str, Any]) -> None:
    check(hp["seed"] is None or validate.is_int(hp["seed"]),
          f"method {method!r}: seed must be an int or None; got {hp['seed']!r}")


def task_generator(seed: int | None, task: int) -> torch.Generator:
    """CPU generator (same draw on CPU and CUDA runs); see the module doc for seed=None."""
    if seed is None:
        return torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,))))
    return torch.Generator().manual_seed((int(seed) * 100003 + task) % (1 << 63))


def snapshot(model: nn.Module, names: Any = None) -> Params:
    return {n: p.detach().clone() for n, p in model.named_parameters()
            if names is None or n in names}


def load_params(state: Params, model: nn.Module, what: str) -> Params:
    """Copy saved per-parameter tensors onto their parameter's device, checking names/shapes."""
    params = dict(model.named_parameters())
    out: Params = {}
    if not isinstance(state, dict):
        raise ValueError(f"load_state_dict: {what} must be a dict of tensors; got "
                         f"{type(state).__name__}")
    for n, t in state.items():
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise ValueError(f"load_state_dict: {what}[{n!r}] must be a floating-point tensor; "
                             f"got {getattr(t, 'dtype', type(t).__name__)}")
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"load_state_dict: {what}[{n!r}] holds non-finite values")
        if n not in params:
            raise ValueError(f"load_state_dict: {what} names parameter {n!r}, which the model "
                             f"does not have")
        if t.shape != params[n].shape:
            raise ValueError(f"load_state_dict: {what}[{n!r}] has shape {tuple(t.shape)}, the "
                             f"parameter {tuple(params[n].shape)}")
        out[n] = t.detach().clone().to(params[n].device)
    return out


def heads(method: Method) -> nn.ModuleList:
    """The model's per-task heads, or a clear error naming the method that needs them."""
    found = getattr(method.model, "heads", None)
    if not isinstance(found, nn.ModuleList):
        raise ValueError(f"method {method.name!r} needs a model with a `heads` nn.ModuleList "
                         "(one head per task)")
    return found


#: state key of the hyper-parameters a state was made with (:func:`made_with`)
MADE_WITH = "made_with"


def made_with(method: Method) -> dict[str, Any]:
    """The hyper-parameters that shape a method's numbers (all but ``seed``), saved in its
    state by methods whose defaults changed while their state kept its layout (lwf, agem,
    packnet, issue 14): the trainer's resume check compares only the hyper-parameters a run
    named, so an older run's state would otherwise continue under the new defaults."""
    return {k: v for k, v in method.hparams.items() if k != "seed"}


def check_made_with(method: Method, state: dict[str, Any]) -> None:
    """Refuse ``state`` unless it was made with ``method``'s hyper-parameters; one without
    the record (an older version) is a ``KeyError``, reported by the trainer as such."""
    saved, mine = state[MADE_WITH], made_with(method)
    if saved != mine:
        diff = sorted(k for k in {*saved, *mine} if saved.get(k) != mine.get(k))
        was = ", ".join(f"{k}={saved.get(k)!r}" for k in diff)
        now = ", ".join(f"{k}={mine.get(k)!r}" for k in diff)
        raise ValueError(f"load_state_dict: this {method.name!r} state was made with other "
                         f"hyper-parameters ({was}; this method has {now}); resume with the "
                         "same ones or start the run again")
