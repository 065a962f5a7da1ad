"""Baseline continual-learning methods on the same hooks as BLIP (issue 5, first part).

Registered names: ``ewc``, ``online-ewc``, ``si``, ``mas``, ``imm-mode``, ``lwf``,
``agem``. Every method trains with plain SGD (``Method.make_optimizer``) and keeps
its whole state in ``state_dict()`` (plain tensors and lists), so a run resumes
from a checkpoint with the same numbers.

Fisher (EWC, online EWC, IMM-mode): :func:`blip.fisher.true_fisher`, i.e. the exact
per-sample kernels ``blip_kernels.fisher_linear_`` / ``fisher_conv2d_`` with targets
*sampled* from the task head (true Fisher), batch-mean loss, squares summed then
divided by the number of samples, at most 80 batches of 100 (conformance README,
section 7). It covers the weights and biases of every ``nn.Linear`` / ``nn.Conv2d``
(quantized subclasses included), heads too: a head not used by the task gets a zero
Fisher. Any other parameter (e.g. BatchNorm affine; the bundled models have none)
is *not* regularised by these three methods and is listed in ``after_task``'s
``unregularised`` stat.

Randomness: with ``seed=None`` (default) the Fisher subset/targets and A-GEM's
memory draws come from torch's global RNG, which the trainer re-seeds from
``(run seed, task)`` before every task, so runs are reproducible and resumable.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .fisher import true_fisher
from .methods import Method, register
from .models import MultiHead

Params = dict[str, Tensor]


# -- helpers ------------------------------------------------------------------------------


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _nonneg(method: str, hp: dict[str, Any], *names: str) -> None:
    for n in names:
        v = hp[n]
        _check(isinstance(v, (int, float)) and v >= 0,
               f"method {method!r}: {n} must be a number >= 0; got {v!r}")


def _pos_int(method: str, hp: dict[str, Any], *names: str) -> None:
    for n in names:
        v = hp[n]
        _check(isinstance(v, int) and v >= 1,
               f"method {method!r}: {n} must be an int >= 1; got {v!r}")


def _seed_ok(method: str, hp: dict[str, Any]) -> None:
    _check(hp["seed"] is None or isinstance(hp["seed"], int),
           f"method {method!r}: seed must be an int or None; got {hp['seed']!r}")


def _generator(seed: int | None, task: int) -> torch.Generator:
    """CPU generator (same draw on CPU and CUDA runs); see the module doc for seed=None."""
    if seed is None:
        return torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,))))
    return torch.Generator().manual_seed((int(seed) * 100003 + task) % (1 << 63))


def _snapshot(model: nn.Module, names: Any = None) -> Params:
    return {n: p.detach().clone() for n, p in model.named_parameters()
            if names is None or n in names}


def _load_params(state: Params, model: nn.Module, what: str) -> Params:
    """Copy saved per-parameter tensors onto their parameter's device, checking names/shapes."""
    params = dict(model.named_parameters())
    out: Params = {}
    for n, t in state.items():
        if n not in params:
            raise ValueError(f"load_state_dict: {what} names parameter {n!r}, which the model "
                             f"does not have")
        if t.shape != params[n].shape:
            raise ValueError(f"load_state_dict: {what}[{n!r}] has shape {tuple(t.shape)}, the "
                             f"parameter {tuple(params[n].shape)}")
        out[n] = t.detach().clone().to(params[n].device)
    return out


def _quadratic(model: nn.Module, weight: Params, anchor: Params) -> Tensor:
    """``Σ weight·(θ − anchor)²`` over the named parameters in ``weight``."""
    params = dict(model.named_parameters())
    terms = [(w * (params[n] - anchor[n]).pow(2)).sum() for n, w in weight.items()]
    if not terms:
        return torch.zeros((), device=next(model.parameters()).device)
    return torch.stack(terms).sum()


def _fisher_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def _task_fisher(method: Method, task: int, train_x: Tensor) -> tuple[Params, dict[str, Any]]:
    """True-Fisher diagonal of the model on ``task`` (see the module doc) and stats."""
    hp, model = method.hparams, method.model
    layers = _fisher_layers(model)
    if not layers:
        raise ValueError(f"method {method.name!r} needs a model with nn.Linear/nn.Conv2d layers")
    fisher, n = true_fisher(
        model, layers, train_x, lambda x: model(x, task), n_batches=hp["fisher_batches"],
        batch_size=hp["fisher_batch_size"], generator=_generator(hp["seed"], task))
    others = [p for p, _ in model.named_parameters() if p not in fisher]
    return fisher, {"fisher_samples": n, "unregularised": others}


def _head_logits(model: nn.Module, x: Tensor, tasks: list[int]) -> list[Tensor]:
    """Logits of several heads on one batch: the trunk runs once on a MultiHead (one
    dropout mask for all heads), otherwise ``model(x, k)`` per head."""
    if isinstance(model, MultiHead):
        h = model.features(x)
        return [model.heads[k](h) for k in tasks]
    return [model(x, k) for k in tasks]


FISHER_HPARAMS: dict[str, Any] = {
    "fisher_batches": 80,  # Fisher: at most this many batches (section 7)
    "fisher_batch_size": 100,  # Fisher: samples per batch (the loss is the batch mean)
    "seed": None,  # Fisher subset/target sampling; None: torch's global RNG (trainer-seeded)
}


# -- quadratic penalties: how they are applied ---------------------------------------------


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
        _check(self.hparams["penalty_step"] in PENALTY_STEPS,
               f"method {self.name!r}: penalty_step must be one of {PENALTY_STEPS}; got "
               f"{self.hparams['penalty_step']!r}")
        self._optimizer: torch.optim.Optimizer | None = None
        self._coef_key: tuple | None = None  # (lrs, version) the cache is for
        self._coef: tuple[list[Tensor], list[Tensor], list[Tensor]] = ([], [], [])
        self._version = 0  # bumped whenever weights/anchors change

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

    def penalty(self) -> Tensor:
        weight, anchor = self.quadratic()
        return self.strength * _quadratic(self.model, weight, anchor)

    def training_loss(self, model: nn.Module, x: Tensor, y: Tensor, task: int) -> Tensor:
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


def _weighted_anchor(f_old: Tensor, a_old: Tensor, f_new: Tensor, a_new: Tensor) -> Tensor:
    """Anchor of ``f_old(θ−a_old)² + f_new(θ−a_new)²`` (same θ-gradient, up to a constant)."""
    total = f_old + f_new
    merged = (f_old * a_old + f_new * a_new) / total.clamp_min(1e-38)
    return torch.where(total > 0, merged, a_new)


# -- EWC and online EWC --------------------------------------------------------------------


@register
class EWC(QuadraticPenaltyMethod):
    """EWC (Kirkpatrick et al. 2017): penalty ``λ/2 · Σ_k Σ_i F_k,i (θ_i − θ*_k,i)²`` over
    the finished tasks ``k``, kept in its summed form ``λ/2 · Σ_i F_i (θ_i − θ̄_i)²`` with
    ``F = Σ_k F_k`` and ``θ̄ = Σ_k F_k θ*_k / F`` (the same gradient, so the same training,
    at constant memory and one term per parameter instead of one per task)."""

    name = "ewc"
    HPARAMS: ClassVar[dict[str, Any]] = {
        **QuadraticPenaltyMethod.HPARAMS,
        "lamb": 5000.0,  # λ, penalty strength (the BLIP/HAT authors' EWC baseline value)
        **FISHER_HPARAMS,
    }

    def __init__(self, model: nn.Module, **hparams: Any) -> None:
        super().__init__(model, **hparams)
        _nonneg(self.name, self.hparams, "lamb")
        _pos_int(self.name, self.hparams, "fisher_batches", "fisher_batch_size")
        _seed_ok(self.name, self.hparams)
        self.fisher: Params = {}  # Σ_k F_k
        self.anchor: Params = {}  # Fisher-weighted mean of the task anchors
        self.tasks = 0

    @property
    def strength(self) -> float:
        return 0.5 * self.hparams["lamb"]

    def quadratic(self) -> tuple[Params, Params]:
        return self.fisher, self.anchor

    def absorb(self, fisher: Params, anchor: Params) -> None:
        """Add one finished task's term ``F_k (θ − θ*_k)²`` to the summed penalty."""
        for n, f in fisher.items():
            if n in self.fisher:
                self.anchor[n] = _weighted_anchor(self.fisher[n], self.anchor[n], f, anchor[n])
                self.fisher[n] = self.fisher[n] + f
            else:
                self.fisher[n], self.anchor[n] = f, anchor[n]
        self.tasks += 1
        self._changed()

    def after_task(self, task: int, train_x: Tensor, train_y: Tensor) -> dict[str, Any]:
        fisher, stats = _task_fisher(self, task, train_x)
        self.absorb(fisher, _snapshot(self.model, fisher))
        return stats

    def state_dict(self) -> dict[str, Any]:
        return {"fisher": self.fisher, "anchor": self.anchor, "tasks": self.tasks}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.fisher = _load_params(state["fisher"], self.model, "fisher")
        self.anchor = _load_params(state["anchor"], self.model, "anchor")
        self.tasks = int(state["tasks"])
        self._changed()


@register
class OnlineEWC(QuadraticPenaltyMethod):
    """Online EWC (Schwarz et al. 2018): one running Fisher ``F ← γF + F_t`` and the
    latest anchor; penalty ``λ/2 · Σ_i F_i (θ_i − θ*_i)²``."""

    name = "online-ewc"
    HPARAMS: ClassVar[dict[str, Any]] = {
        **QuadraticPenaltyMethod.HPARAMS,
        "lamb": 5000.0,  # λ, penalty strength (as our EWC, so the two compare directly)
        "gamma": 1.0,  # γ, decay of the running Fisher per task (1: no forgetting)
        **FISHER_HPARAMS,
    }

    def __init__(self, model: nn.Module, **hparams: Any) -> None:
        super().__init__(model, **hparams)
        _nonneg(self.name, self.hparams, "lamb", "gamma")
        _pos_int(self.name, self.hparams, "fisher_batches", "fisher_batch_size")
        _seed_ok(self.name, self.hparams)
        self.fisher: Params = {}
        self.anchor: Params = {}

    @property
    def strength(self) -> float:
        return 0.5 * self.hparams["lamb"]

    def quadratic(self) -> tuple[Params, Params]:
        return self.fisher, self.anchor

    def after_task(self, task: int, train_x: Tensor, train_y: Tensor) -> dict[str, Any]:
        new, stats = _task_fisher(self, task, train_x)
        g = self.hparams["gamma"]
        self.fisher = {n: g * self.fisher[n] + f if n in self.fisher else f
                       for n, f in new.items()}
        self.anchor = _snapshot(self.model, self.fisher)
        self._changed()
        return stats

    def state_dict(self) -> dict[str, Any]:
        return {"fisher": self.fisher, "anchor": self.anchor}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.fisher = _load_params(state["fisher"], self.model, "fisher")
        self.anchor = _load_params(state["anchor"], self.model, "anchor")
        self._changed()


# -- SI -------------------------------------------------------------------------------------


@register
class SI(QuadraticPenaltyMethod):
    """Synaptic Intelligence (Zenke et al. 2017).

    During a task, ``ω_i += −g_i·Δθ_i`` every step, with ``g`` the gradient of the
    *unregularised* task loss (as the paper: the penalty's own gradient is removed
    analytically from ``.grad``) and ``Δθ`` the optimizer's actual update. After it,
    ``Ω_i += max(ω_i, 0) / ((θ_end,i − θ_start,i)² + ξ)`` (negative path integrals,
    possible with momentum or the penalty's pull, are clipped: a negative importance
    would reward drifting), and the anchor becomes ``θ_end`` (the trainer's restored
    best model). Penalty ``c · Σ_i Ω_i (θ_i − θ*_i)²`` over every parameter.
    """

    name = "si"
    HPARAMS: ClassVar[dict[str, Any]] = {
        **QuadraticPenaltyMethod.HPARAMS,
        "c": 0.1,  # c, penalty strength (Zenke et al.'s permuted-MNIST/CIFAR value)
        "xi": 1e-3,  # ξ, damping of the normalisation by the squared total displacement
    }

    def __init__(self, model: nn.Module, **hparams: Any) -> None:
        super().__init__(model, **hparams)
        _nonneg(self.name, self.hparams, "c")
        _check(isinstance(self.hparams["xi"], (int, float)) and self.hparams["xi"] > 0,
               f"method 'si': xi must be a number > 0; got {self.hparams['xi']!r}")
        self.omega_total: Params = {}  # Ω, accumulated importance
        self.anchor: Params = {}  # θ* after the last task
        self.path: Params = {}  # ω, this task's path integral
        self.start: Params = {}  # θ at this task's start
        self._grad: Params = {}  # unregularised gradient of the current step
        self._before: Params = {}  # θ before the current step

    @property
    def strength(self) -> float:
        return self.hparams["c"]

    def quadratic(self) -> tuple[Params, Params]:
        return self.omega_total, self.anchor

    def before_task(self, task: int) -> None:
        self.start = _snapshot(self.model)
        self.path = {n: torch.zeros_like(p) for n, p in self.start.items()}

    def after_backward(self, task: int) -> None:
        if not self.start:
            raise RuntimeError("method 'si': call before_task() before training")
        c = self.hparams["c"]
        gradient_form = self.hparams["penalty_step"] == "gradient"
        self._grad, self._before = {}, {}
        with torch.no_grad():
            for n, p in self.model.named_parameters():
                if p.grad is None:
                    continue
                g = p.grad.detach().clone()
                if gradient_form and n in self.omega_total:  # d/dθ of c·Ω(θ−θ*)²
                    g -= 2 * c * self.omega_total[n] * (p - self.anchor[n])
                self._grad[n] = g
                self._before[n] = p.detach().clone()

    def after_step(self, task: int) -> None:
        super().after_step(task)  # the proximal penalty step, part of this step's Δθ
        with torch.no_grad():
            params = dict(self.model.named_parameters())
            for n, g in self._grad.items():
                self.path[n] -= g * (params[n] - self._before[n])
        self._grad, self._before = {}, {}

    def after_task(self, task: int, train_x: Tensor, train_y: Tensor) -> dict[str, Any]:
        if not self.start:
            raise RuntimeError("method 'si': after_task() without before_task()")
        xi = self.hparams["xi"]
        end = _snapshot(self.model)
        for n, w in self.path.items():
            new = w.clamp(min=0) / ((end[n] - self.start[n]).pow(2) + xi)
            self.omega_total[n] = self.omega_total[n] + new if n in self.omega_total else new
        self.anchor = end
        self.path, self.start = {}, {}
        self._changed()
        return {"importance_mean": float(torch.cat([o.flatten() for o in
                                                    self.omega_total.values()]).mean())}

    def state_dict(self) -> dict[str, Any]:
        return {"omega": self.omega_total, "anchor": self.anchor, "path": self.path,
                "start": self.start}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.omega_total = _load_params(state["omega"], self.model, "omega")
        self.anchor = _load_params(state["anchor"], self.model, "anchor")
        self.path = _load_params(state.get("path", {}), self.model, "path")
        self.start = _load_params(state.get("start", {}), self.model, "start")
        self._changed()


# -- MAS ------------------------------------------------------------------------------------


def mas_importance(model: nn.Module, x: Tensor, task: int, chunk: int = 64) -> Params:
    """``mean_n |∂‖f(x_n)‖²/∂θ|`` per parameter, with ``f`` the task head's logits:
    exact per-sample gradients (``torch.func``), model in eval mode (per-sample
    gradients are then well defined with BatchNorm/dropout); flags restored."""
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
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        for s in range(0, x.shape[0], chunk):
            grads = per_sample(params, x[s:s + chunk])
            for n, g in grads.items():
                acc[n] += g.abs().sum(0)
    finally:
        for m, flag in modes.items():
            m.training = flag
    return {n: a / x.shape[0] for n, a in acc.items()}


@register
class MAS(QuadraticPenaltyMethod):
    """Memory Aware Synapses (Aljundi et al. 2018): importance
    ``Ω_t = mean_n |∂‖f(x_n)‖²/∂θ|`` over the task's data (per-sample, as the paper),
    summed over tasks; anchor = θ after the last task; penalty ``λ Σ Ω (θ − θ*)²``."""

    name = "mas"
    HPARAMS: ClassVar[dict[str, Any]] = {
        **QuadraticPenaltyMethod.HPARAMS,
        "lamb": 1.0,  # λ, penalty strength (the paper's value)
        "max_samples": None,  # samples used for Ω (None: all the trainer passes, <= 20000)
        "chunk": 64,  # samples per vectorised per-sample-gradient pass (memory knob)
        "seed": None,  # subset draw when max_samples is set; None: torch's global RNG
    }

    def __init__(self, model: nn.Module, **hparams: Any) -> None:
        super().__init__(model, **hparams)
        _nonneg(self.name, self.hparams, "lamb")
        _pos_int(self.name, self.hparams, "chunk")
        if self.hparams["max_samples"] is not None:
            _pos_int(self.name, self.hparams, "max_samples")
        _seed_ok(self.name, self.hparams)
        self.omega: Params = {}
        self.anchor: Params = {}

    @property
    def strength(self) -> float:
        return self.hparams["lamb"]

    def quadratic(self) -> tuple[Params, Params]:
        return self.omega, self.anchor

    def after_task(self, task: int, train_x: Tensor, train_y: Tensor) -> dict[str, Any]:
        m = self.hparams["max_samples"]
        x = train_x
        if m is not None and x.shape[0] > m:
            idx = torch.randperm(x.shape[0], generator=_generator(self.hparams["seed"], task))
            x = x[idx[:m].to(x.device)]
        new = mas_importance(self.model, x, task, self.hparams["chunk"])
        self.omega = {n: self.omega[n] + o if n in self.omega else o for n, o in new.items()}
        self.anchor = _snapshot(self.model, self.omega)
        self._changed()
        return {"importance_samples": int(x.shape[0])}

    def state_dict(self) -> dict[str, Any]:
        return {"omega": self.omega, "anchor": self.anchor}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.omega = _load_params(state["omega"], self.model, "omega")
        self.anchor = _load_params(state["anchor"], self.model, "anchor")
        self._changed()


# -- IMM (mode) -----------------------------------------------------------------------------


@register
class IMMMode(QuadraticPenaltyMethod):
    """Mode-IMM (Lee et al. 2017) as the BLIP authors' mini-ImageNet baseline: train
    each task from the previous (merged) model (weight transfer) with the L2-transfer
    penalty ``λ/2 · Σ (θ − θ_prev)²``; after the task, merge
    ``θ ← (F_t θ_t + F_{<t} θ_prev) / (F_t + F_{<t})`` with ``F_{<t}`` the running sum of
    the earlier tasks' Fishers (= the Fisher-weighted mode of all task models with equal
    α), then ``F_{<t} += F_t``; training continues from the merge.

    Where ``F_{<t}`` is zero (e.g. the new task's head, future heads) and for
    parameters without a Fisher the trained value is kept; where only ``F_t`` is zero
    (old heads), the previous value. (The authors' script rebinds the loop
    variable instead of writing the merge into the model, so there it never took
    effect, and would have zeroed zero-Fisher entries; this is the intended merge.)
    """

    name = "imm-mode"
    HPARAMS: ClassVar[dict[str, Any]] = {
        **QuadraticPenaltyMethod.HPARAMS,
        "lamb": 0.01,  # λ of the L2-transfer penalty (the authors' script default)
        **FISHER_HPARAMS,
    }

    def __init__(self, model: nn.Module, **hparams: Any) -> None:
        super().__init__(model, **hparams)
        _nonneg(self.name, self.hparams, "lamb")
        _pos_int(self.name, self.hparams, "fisher_batches", "fisher_batch_size")
        _seed_ok(self.name, self.hparams)
        self.fisher: Params = {}  # Σ of the finished tasks' Fishers
        self.prev: Params = {}  # merged model after the last task (all parameters)

    @property
    def strength(self) -> float:
        return 0.5 * self.hparams["lamb"]

    def quadratic(self) -> tuple[Params, Params]:
        ones = {n: torch.ones((), device=p.device) for n, p in self.prev.items()}
        return ones, self.prev

    def after_task(self, task: int, train_x: Tensor, train_y: Tensor) -> dict[str, Any]:
        new, stats = _task_fisher(self, task, train_x)
        if self.fisher:
            with torch.no_grad():
                for n, p in self.model.named_parameters():
                    if n not in new:
                        continue
                    old_f = self.fisher[n]
                    total = new[n] + old_f
                    merged = (new[n] * p + old_f * self.prev[n]) / total.clamp_min(1e-30)
                    # exact where only one side has a Fisher (a head seen by one task)
                    merged = torch.where(new[n] == 0, self.prev[n], merged)
                    p.copy_(torch.where(old_f == 0, p, merged))
            self.fisher = {n: self.fisher[n] + f for n, f in new.items()}
        else:
            self.fisher = new
        self.prev = _snapshot(self.model)
        self._changed()
        return {**stats, "merged": task > 0}

    def state_dict(self) -> dict[str, Any]:
        return {"fisher": self.fisher, "prev": self.prev}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.fisher = _load_params(state["fisher"], self.model, "fisher")
        self.prev = _load_params(state["prev"], self.model, "prev")
        self._changed()


# -- LwF ------------------------------------------------------------------------------------


def distillation_loss(new_logits: Tensor, old_logits: Tensor, T: float) -> Tensor:
    """Li & Hoiem's modified cross-entropy: ``−Σ softmax(old/T)·log softmax(new/T)``,
    batch mean (the temperature-scaled, renormalised probabilities of the paper)."""
    target = F.softmax(old_logits.float() / T, dim=1)
    return -(target * F.log_softmax(new_logits.float() / T, dim=1)).sum(1).mean()


@register
class LwF(Method):
    """Learning without Forgetting (Li & Hoiem 2016): on task ``t``, cross-entropy on
    head ``t`` plus ``λ · Σ_{k<t}`` distillation of head ``k`` towards a frozen copy of
    the model taken after task ``t−1`` (eval mode), on the current batch. The paper's
    warm-up (training the new head alone first) is not done."""

    name = "lwf"
    HPARAMS: ClassVar[dict[str, Any]] = {
        **Method.HPARAMS,
        "lamb": 1.0,  # λ_o, weight of the distillation terms (the paper's value)
        "T": 2.0,  # distillation temperature (the paper's value)
    }

    def __init__(self, model: nn.Module, **hparams: Any) -> None:
        super().__init__(model, **hparams)
        _nonneg(self.name, self.hparams, "lamb")
        _check(isinstance(self.hparams["T"], (int, float)) and self.hparams["T"] > 0,
               f"method 'lwf': T must be a number > 0; got {self.hparams['T']!r}")
        self.old_model: nn.Module | None = None
        self.old_tasks = 0  # heads 0..old_tasks-1 are distilled

    def _freeze_copy(self) -> nn.Module:
        old = copy.deepcopy(self.model).eval()
        for p in old.parameters():
            p.requires_grad_(False)
        return old

    @torch.no_grad()
    def distillation_targets(self, x: Tensor, task: int) -> list[Tensor]:
        """The old model's logits of every earlier head on ``x`` (empty on task 0)."""
        if self.old_model is None:
            return []
        return _head_logits(self.old_model, x, list(range(min(task, self.old_tasks))))

    def training_loss(self, model: nn.Module, x: Tensor, y: Tensor, task: int) -> Tensor:
        targets = self.distillation_targets(x, task)
        outs = _head_logits(model, x, list(range(len(targets))) + [task])
        loss = F.cross_entropy(outs[-1], y)
        if targets:
            dist = sum(distillation_loss(o, t, self.hparams["T"])
                       for o, t in zip(outs[:-1], targets, strict=True))
            loss = loss + self.hparams["lamb"] * dist
        return loss

    def after_task(self, task: int, train_x: Tensor, train_y: Tensor) -> dict[str, Any]:
        self.old_model = self._freeze_copy()
        self.old_tasks = task + 1
        return {}

    def state_dict(self) -> dict[str, Any]:
        old = None if self.old_model is None else self.old_model.state_dict()
        return {"old_model": old, "old_tasks": self.old_tasks}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.old_tasks = int(state["old_tasks"])
        if state["old_model"] is None:
            self.old_model = None
            return
        self.old_model = self._freeze_copy()
        self.old_model.load_state_dict(state["old_model"])


# -- A-GEM ----------------------------------------------------------------------------------


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
    HPARAMS: ClassVar[dict[str, Any]] = {
        **Method.HPARAMS,
        "mem_per_task": 250,  # episodic memory samples kept per task (the paper's MNIST/CIFAR)
        "ref_batch_size": 256,  # memory samples per reference gradient (the paper's value)
        "seed": None,  # memory selection; None: torch's global RNG (trainer-seeded)
    }

    def __init__(self, model: nn.Module, **hparams: Any) -> None:
        super().__init__(model, **hparams)
        _pos_int(self.name, self.hparams, "mem_per_task", "ref_batch_size")
        _seed_ok(self.name, self.hparams)
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

    def after_task(self, task: int, train_x: Tensor, train_y: Tensor) -> dict[str, Any]:
        if len(self.mem_x) != task:
            raise RuntimeError(f"method 'agem': memory holds {len(self.mem_x)} tasks at the "
                               f"end of task {task}; tasks must run in order from 0")
        m = min(self.hparams["mem_per_task"], train_x.shape[0])
        idx = torch.randperm(train_x.shape[0], generator=_generator(self.hparams["seed"], task))
        idx = idx[:m]
        self.mem_x.append(train_x[idx.to(train_x.device)].detach().clone())
        self.mem_y.append(train_y[idx.to(train_y.device)].detach().clone())
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


__all__ = ["AGEM", "EWC", "IMMMode", "LwF", "MAS", "OnlineEWC", "QuadraticPenaltyMethod", "SI",
           "distillation_loss", "mas_importance"]
