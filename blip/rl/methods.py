"""Continual-learning methods for the RL runner: ``blip``, ``ewc`` (online EWC),
``finetune`` and ``freeze``.

A method decides which parameters game ``g`` trains (the shared trunk and game
``g``'s heads), may add a penalty to PPO's loss, may act after every optimizer step,
and ends a game with a Fisher estimate on the game's last rollout. Old games'
heads get no gradient (PPO's loss only uses the current heads), so Adam leaves them
untouched; only the trunk needs protecting.

Why these are not :class:`blip.methods.Method` subclasses: the classification hooks own
what RL does differently. ``Method.training_loss(model, x, y, task)`` is a supervised loss
on labelled batches, while here the loss is PPO's (the method only adds ``penalty()``);
``Method.make_optimizer`` builds (constrained) SGD, while PPO trains with Adam and BLIP
projects after each Adam step; ``Method.after_task`` gets labelled samples, while a game
ends with unlabelled observations and the runner's generator (targets are sampled actions).
What is the same concept is shared: the BLIP strategy (:class:`blip.BLIP`), the true-Fisher
kernels (:func:`blip.fisher.true_fisher`, the same budget) and the quadratic penalty
(:func:`blip.methods.quadratic.quadratic_sum`). One registry here (:func:`register`).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .. import validate
from ..fisher import FISHER_BATCH_SIZE, FISHER_BATCHES, true_fisher
from ..methods.base import add_unique
from ..methods.quadratic import quadratic_sum
from ..strategy import BLIP
from .agent import HEADS, ActorCritic

#: Fisher sample at the end of a game: every observation of the last rollout
#: (16 x 125 = 2000 with the defaults) in batches of 100, at most 80 batches.
FISHER_BATCH = FISHER_BATCH_SIZE
FISHER_MAX_BATCHES = FISHER_BATCHES

REGISTRY: dict[str, type[RLMethod]] = {}


def register(cls: type[RLMethod]) -> type[RLMethod]:
    return add_unique(REGISTRY, cls, "RL method")


class RLMethod:
    name: ClassVar[str] = "finetune"
    #: the run settings (RLConfig fields, where their defaults live) the method takes
    SETTINGS: ClassVar[tuple[str, ...]] = ()

    def __init__(self, model: ActorCritic, **hparams: Any) -> None:
        self.model = model
        self.hparams = hparams

    def trainable(self, game: int) -> list[nn.Parameter]:
        return [*self.model.trunk.parameters(), *self.model.actors[game].parameters(),
                *self.model.critics[game].parameters()]

    def penalty(self) -> Tensor | None:
        return None

    def after_step(self) -> None:
        return None

    def end_game(self, game: int, obs: Tensor, generator: torch.Generator) -> dict[str, Any]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None


@register
class BLIPMethod(RLMethod):
    """Adam, then BLIP's projection after every step (the fused per-layer kernel); at
    the end of a game: true Fisher of the policy on the last rollout (actions sampled
    from the policy), bit update, sync (:meth:`blip.BLIP.end_task`)."""

    name = "blip"
    SETTINGS = ("F_prior", "max_bit")

    def __init__(self, model: ActorCritic, *, F_prior: float, max_bit: int, **hp: Any) -> None:
        super().__init__(model, F_prior=F_prior, max_bit=max_bit, **hp)
        self.strategy = BLIP(model, F_prior=F_prior, max_bit=max_bit, exclude=HEADS,
                             n_batches=FISHER_MAX_BATCHES, batch_size=FISHER_BATCH)

    def after_step(self) -> None:
        self.strategy.project()

    def end_game(self, game: int, obs: Tensor, generator: torch.Generator) -> dict[str, Any]:
        model = self.model
        stats = self.strategy.end_task(game, obs, lambda x: model.policy_logits(x, game),
                                       generator=generator)
        return {"fisher_samples": stats["fisher_samples"],
                "fisher_seconds": stats["fisher_seconds"],
                "capacity": stats["capacity"]}

    def state_dict(self) -> dict[str, Any]:
        return self.strategy.state_dict(include_model=False)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.strategy.load_state_dict(state)


@register
class OnlineEWC(RLMethod):
    """Online EWC on the trunk: ``F <- gamma F + F_g`` (true Fisher of the policy on the
    last rollout, the per-sample kernels of :func:`blip.fisher.true_fisher`), anchor =
    the trunk after the latest game; penalty ``lamb/2 * sum F (theta - anchor)^2``."""

    name = "ewc"
    SETTINGS = ("lamb",)

    def __init__(self, model: ActorCritic, *, lamb: float, gamma: float = 1.0,
                 **hp: Any) -> None:
        validate.number("lamb", lamb, lo=0.0)  # finite in float32, not a bool
        if not (isinstance(gamma, (int, float)) and 0 <= gamma <= 1):
            raise ValueError(f"gamma must be in [0, 1]; got {gamma!r}")
        super().__init__(model, lamb=lamb, gamma=gamma, **hp)
        self.fisher: dict[str, Tensor] = {}
        self.anchor: dict[str, Tensor] = {}

    def _trunk_layers(self) -> list[tuple[str, nn.Module]]:
        return [(f"trunk.{n}", m) for n, m in self.model.trunk.named_modules()
                if isinstance(m, (nn.Linear, nn.Conv2d))]

    def penalty(self) -> Tensor | None:
        if not self.fisher:
            return None
        return 0.5 * self.hparams["lamb"] * quadratic_sum(self.model, self.fisher, self.anchor)

    def end_game(self, game: int, obs: Tensor, generator: torch.Generator) -> dict[str, Any]:
        model = self.model
        fisher, n = true_fisher(model, self._trunk_layers(), obs,
                                lambda x: model.policy_logits(x, game),
                                n_batches=FISHER_MAX_BATCHES, batch_size=FISHER_BATCH,
                                generator=generator)
        g = self.hparams["gamma"]
        for k, f in fisher.items():
            self.fisher[k] = g * self.fisher[k] + f if k in self.fisher else f
        params = dict(model.named_parameters())
        self.anchor = {k: params[k].detach().clone() for k in self.fisher}
        return {"fisher_samples": n,
                "fisher_mean": float(torch.stack([f.mean() for f in self.fisher.values()])
                                     .mean())}

    def state_dict(self) -> dict[str, Any]:
        return {"fisher": self.fisher, "anchor": self.anchor}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        params = dict(self.model.named_parameters())
        for what in ("fisher", "anchor"):
            for k in state[what]:
                if k not in params:
                    raise ValueError(f"ewc state names {k!r}, which the model does not have")
        dev = next(self.model.parameters()).device
        self.fisher = {k: v.to(dev) for k, v in state["fisher"].items()}
        self.anchor = {k: v.to(dev) for k, v in state["anchor"].items()}


@register
class Finetune(RLMethod):
    """Plain sequential PPO on the shared trunk: the forgetting baseline."""

    name = "finetune"


@register
class Freeze(RLMethod):
    """The trunk learns game 1 only; later games train their heads on frozen features."""

    name = "freeze"

    def trainable(self, game: int) -> list[nn.Parameter]:
        frozen = game > 0
        for p in self.model.trunk.parameters():
            p.requires_grad_(not frozen)  # also skips the trunk's backward
        if frozen:
            return [*self.model.actors[game].parameters(), *self.model.critics[game].parameters()]
        return super().trainable(game)


METHODS = tuple(REGISTRY)  # ("blip", "ewc", "finetune", "freeze")


def make_method(name: str, model: ActorCritic, **settings: Any) -> RLMethod:
    """Method ``name`` with those run ``settings`` it takes (its SETTINGS)."""
    if name not in REGISTRY:
        raise ValueError(f"method must be one of {METHODS}; got {name!r}")
    cls = REGISTRY[name]
    return cls(model, **{k: v for k, v in settings.items() if k in cls.SETTINGS})


__all__ = ["METHODS", "REGISTRY", "BLIPMethod", "Finetune", "Freeze", "OnlineEWC", "RLMethod",
           "make_method", "register"]
