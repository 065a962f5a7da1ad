"""The shared proximal quadratic penalty of EWC, online EWC, SI, MAS and IMM-mode, the
Fisher estimates of the three Fisher-based ones, and the versioning of their state.

Fisher by default: each method's reference convention (:mod:`.importance`, see each method's
docstring). ``fisher="blip"`` (BLIP's convention, these methods' default before the
reference conventions): :func:`blip.fisher.true_fisher`, i.e. the exact
per-sample kernels ``blip_kernels.fisher_linear_`` / ``fisher_conv2d_`` with targets
*sampled* from the task head (true Fisher), batch-mean loss, squares summed then
divided by the number of samples, at most 80 batches of 100 (docs/semantics.md,
section 7). It covers the weights and biases of every ``nn.Linear`` / ``nn.Conv2d``
(quantized subclasses included), heads too: a head not used by the task gets a zero
Fisher. Any other parameter (e.g. BatchNorm affine; the bundled models have none)
is *not* regularised by these three methods and is listed in ``after_task``'s
``unregularised`` stat.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import distributed
from ..fisher import FISHER_BATCH_SIZE, FISHER_BATCHES, true_fisher
from .base import Method, Params, check, load_params, pos_int, seed_ok, task_generator
from .importance import empirical_fisher


def quadratic_sum(model: nn.Module, weight: Params, anchor: Params) -> Tensor:
    """``Σ weight·(θ − anchor)²`` over the named parameters in ``weight``."""
    params = dict(model.named_parameters())
    terms = [(w * (params[n] - anchor[n]).pow(2)).sum() for n, w in weight.items()]
    if not terms:
        return torch.zeros((), device=next(model.parameters()).device)
    return torch.stack(terms).sum()


def _fisher_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def task_fisher(method: Method, task: int, sample_x: Tensor) -> tuple[Params, dict[str, Any]]:
    """True-Fisher diagonal of the model on ``task`` (see the module doc) and stats."""
    hp, model = method.hparams, method.model
    layers = _fisher_layers(model)
    if not layers:
        raise ValueError(f"method {method.name!r} needs a model with nn.Linear/nn.Conv2d layers")
    fisher, n = true_fisher(
        model, layers, sample_x, lambda x: model(x, task),
        n_batches=_or(hp["fisher_batches"], FISHER_BATCHES),
        batch_size=_or(hp["fisher_batch_size"], FISHER_BATCH_SIZE),
        generator=task_generator(hp["seed"], task))
    others = [p for p, _ in model.named_parameters() if p not in fisher]
    return fisher, {"fisher_samples": n, "unregularised": others}


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value


def reference_fisher(method: QuadraticPenaltyMethod, task: int, sample_x: Tensor,
                     sample_y: Tensor, *, scale: float, training: bool,
                     shuffle: bool) -> tuple[Params, dict[str, Any]]:
    """Empirical Fisher of a reference baseline (:func:`.importance.empirical_fisher`):
    batches of ``fisher_batch_size`` (None: the run's training batch size, as the references
    reuse their training loader), at most ``fisher_batches`` (None: the whole sample),
    shuffled with the method's task generator or in the sample's order."""
    hp = method.hparams
    order = (torch.randperm(sample_x.shape[0], generator=task_generator(hp["seed"], task))
             if shuffle else None)
    batch = hp["fisher_batch_size"] or method.run_batch_size()
    fisher, n_batches = empirical_fisher(
        method.model, sample_x, sample_y, task, order=order, scale=scale, training=training,
        batch_size=batch, max_batches=hp["fisher_batches"])
    others = [p for p, _ in method.model.named_parameters() if p not in fisher]
    return fisher, {"fisher_samples": min(sample_x.shape[0], n_batches * batch),
                    "fisher_batches": n_batches, "fisher_batch_size": batch,
                    "unregularised": others}


FISHERS = ("reference", "blip")


def check_fisher_hparams(method: Method) -> None:
    """``fisher`` is one of :data:`FISHERS`; the batch budget is None or a positive int."""
    hp = method.hparams
    check(hp["fisher"] in FISHERS, f"method {method.name!r}: fisher must be one of {FISHERS}; "
                                   f"got {hp['fisher']!r}")
    for k in ("fisher_batches", "fisher_batch_size"):
        if hp[k] is not None:
            pos_int(method.name, hp, k)
    seed_ok(method.name, hp)



FISHER_HPARAMS: dict[str, Any] = {
    # "reference": the method's reference estimator (its docstring); "blip": BLIP's true
    # Fisher of docs/semantics.md section 7 (these methods' default before)
    "fisher": "reference",
    # at most this many batches; None: "reference" the whole sample, "blip" 80 (section 7)
    "fisher_batches": None,
    # samples per batch; None: "reference" the run's training batch size, "blip" 100
    "fisher_batch_size": None,
    "seed": None,  # Fisher shuffling/sampling; None: torch's global RNG (trainer-seeded)
}


# -- quadratic penalties: how they are applied ---------------------------------------------


#: layout of the methods' saved state; 2: the reference conventions (older states refused)
STATE_VERSION = 2
#: importance batch size before training_loss has seen a batch: the BLIP authors' baseline
#: command line (their README, mini-ImageNet: ``run_baselines.py ... --sbatch 32``)
DEFAULT_TRAIN_BATCH = 32

PENALTY_STEPS = ("proximal", "gradient")
PENALTY_HPARAMS: dict[str, Any] = {
    "penalty_step": "proximal",  # "proximal" (stable for any stiffness) or "gradient"
}


class QuadraticPenaltyMethod(Method, ABC):
    """Base of the methods whose penalty is ``strength · Σ_i w_i (θ_i − a_i)²``
    (EWC, online EWC, SI, MAS, IMM-mode's L2 transfer). Subclasses define
    :meth:`quadratic` (weights ``w`` and anchors ``a`` per parameter name) and
    :attr:`strength`.

    ``penalty_step="proximal"`` (default): the penalty stays out of the loss; after every
    optimizer step each parameter moves to the exact minimiser of
    ``‖θ − θ_step‖²/(2·lr) + strength·w(θ − a)²``, i.e. ``θ ← θ + k/(1+k)·(a − θ)`` with
    ``k = 2·lr·strength·w``. Why: with SGD at the benchmarks' learning rates, SI's and
    MAS's importances at their papers' strengths give ``k`` above 2, where the explicit
    gradient step oscillates with growing amplitude and the run ends in NaN; the proximal
    step is stable for any ``k``, has the same fixed points and agrees with the gradient
    step to first order in ``lr``. With SGD momentum ``μ`` (dampening ``d``) the loss
    step's stationary size is ``lr·(1−d)/(1−μ)`` times the gradient, so that is the ``lr``
    the pull uses: the fixed points stay those of loss + penalty. ``"gradient"``: the
    penalty is added to the loss, as the papers write it.
    """

    HPARAMS: ClassVar[dict[str, Any]] = {**Method.HPARAMS, **PENALTY_HPARAMS}

    def __init__(self, model: nn.Module, **hparams: Any) -> None:
        super().__init__(model, **hparams)
        check(self.hparams["penalty_step"] in PENALTY_STEPS,
               f"method {self.name!r}: penalty_step must be one of {PENALTY_STEPS}; got "
               f"{self.hparams['penalty_step']!r}")
        self._optimizer: torch.optim.Optimizer | None = None
        self._coef_key: tuple | None = None  # (lrs, version) the cache is for
        self._coef: tuple[list[Tensor], list[Tensor], list[Tensor]] = ([], [], [])
        self._version = 0  # bumped whenever weights/anchors change
        # the references estimate importances in batches of their training batch size:
        # the largest batch training_loss has seen (the default until the first one)
        self.train_batch_size = DEFAULT_TRAIN_BATCH
        self._seen_batch = False
        self._largest_share = 0  # the largest batch this rank's training_loss saw

    @property
    @abstractmethod
    def strength(self) -> float:
        """The penalty's factor in front of ``Σ w(θ − a)²``."""

    @abstractmethod
    def quadratic(self) -> tuple[Params, Params]:
        """Per-parameter weights and anchors of the penalty (empty before the first task)."""

    def _changed(self) -> None:
        """Call after changing the weights or anchors: invalidates the proximal cache."""
        self._version += 1

    #: the per-parameter tensors (attribute names, also their state_dict keys) to checkpoint
    STATE: ClassVar[tuple[str, ...]] = ()
    #: hparams that change what the saved tensors mean: a state made with other values is
    #: refused on load, as is one without ``conventions`` (older layouts: a KeyError, which
    #: the trainer reports as a checkpoint of another version of the method)
    CONVENTIONS: ClassVar[tuple[str, ...]] = ()

    def conventions(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, **{k: self.hparams[k] for k in self.CONVENTIONS}}

    def state_dict(self) -> dict[str, Any]:
        return {**{k: getattr(self, k) for k in self.STATE}, "conventions": self.conventions(),
                "train_batch_size": self.train_batch_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # everything validated first, then assigned: a rejected state changes nothing
        saved, mine = state["conventions"], self.conventions()
        if saved != mine:
            raise ValueError(f"load_state_dict: this {self.name!r} state was made with "
                             f"{saved!r}, this method has {mine!r}; resume with the same "
                             f"hyper-parameters or start the run again")
        loaded = {k: load_params(state[k], self.model, k) for k in self.STATE}
        loaded.update(self._other_state(state))
        batch = state["train_batch_size"]
        check(isinstance(batch, int) and batch >= 1,
              f"load_state_dict: train_batch_size must be an int >= 1; got {batch!r}")
        loaded["train_batch_size"] = batch
        for k, v in loaded.items():
            setattr(self, k, v)
        self._changed()

    def _other_state(self, state: dict[str, Any]) -> dict[str, Any]:
        """Attributes beyond ``STATE``'s tensors that ``state`` restores, converted and
        checked (assigned only with everything else)."""
        return {}

    def run_batch_size(self) -> int:
        """:attr:`train_batch_size`, the run's largest training batch. Under torch.distributed
        training_loss sees one rank's share of each batch; as :func:`distributed.rows` splits
        every batch alike, the ranks' largest shares add up to the largest global batch,
        which is stored (so the checkpointed state holds it). Every rank must call it."""
        if not distributed.is_distributed():
            return self.train_batch_size
        largest = torch.tensor([self._largest_share], dtype=torch.int64)
        distributed.all_reduce_sum_([largest])
        if int(largest) > 0:  # else no batch since the start or the resume: the saved size
            self.train_batch_size = int(largest)
        return self.train_batch_size

    def penalty(self) -> Tensor:
        weight, anchor = self.quadratic()
        return self.strength * quadratic_sum(self.model, weight, anchor)

    def training_loss(self, model: nn.Module, x: Tensor, y: Tensor, task: int) -> Tensor:
        if not self._seen_batch or x.shape[0] > self.train_batch_size:
            self.train_batch_size, self._seen_batch = int(x.shape[0]), True
        # a stand-in row (this rank's share empty) is not part of the batch
        self._largest_share = max(self._largest_share, distributed.counted_rows(int(x.shape[0])))
        loss = F.cross_entropy(model(x, task), y)
        if self.hparams["penalty_step"] == "gradient" and self.quadratic()[0]:
            return loss + self.penalty()
        return loss

    def make_optimizer(self, task: int, lr: float) -> torch.optim.Optimizer:
        self._optimizer = super().make_optimizer(task, lr)
        return self._optimizer

    def after_step(self, task: int) -> None:
        if self.hparams["penalty_step"] == "proximal":
            self.proximal_step()

    def proximal_step(self) -> None:
        """θ ← θ + k/(1+k)·(a − θ) for every penalised parameter, at the optimizer's lr."""
        weight, anchor = self.quadratic()
        if not weight:
            return
        if self._optimizer is None:
            raise RuntimeError(f"method {self.name!r}: the proximal penalty step needs the "
                               f"learning rate; build the optimizer with make_optimizer()")
        groups = self._optimizer.param_groups
        lrs = {id(p): _stationary_lr(g) for g in groups for p in g["params"]}
        key = (id(self._optimizer), tuple(_stationary_lr(g) for g in groups), self._version)
        if key != self._coef_key:  # the lr schedule or the penalty changed
            params, coefs, anchors = [], [], []
            for n, p in self.model.named_parameters():
                if n in weight and id(p) in lrs:
                    k = (2 * lrs[id(p)] * self.strength) * weight[n]
                    params.append(p)
                    coefs.append((k / (1 + k)).expand_as(p).contiguous())
                    anchors.append(anchor[n])
            self._coef, self._coef_key = (params, coefs, anchors), key
        params, coefs, anchors = self._coef
        with torch.no_grad():
            delta = torch._foreach_sub(anchors, params)
            torch._foreach_mul_(delta, coefs)
            torch._foreach_add_(params, delta)


def _stationary_lr(group: dict[str, Any]) -> float:
    """Step size per unit of a constant gradient once SGD's momentum buffer has settled."""
    mu = float(group.get("momentum", 0.0))
    if mu == 0:
        return float(group["lr"])
    return float(group["lr"]) * (1 - float(group.get("dampening", 0.0))) / (1 - mu)

