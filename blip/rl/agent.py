"""Actor-critic network: one shared conv trunk of BLIP-quantized layers, one actor and
one critic head per game.

The trunk is built from :class:`~blip.nn.QuantConv2d` / :class:`~blip.nn.QuantLinear`
for *every* method, so all methods start from the same (BLIP) initialisation; only
the ``blip`` method projects and freezes bits. In ``"continuous"`` forward mode (the
default, as the authors' code) a quantized layer computes exactly what the plain
layer would. Heads are plain ``nn.Linear`` (task-specific, never constrained).
"""

from __future__ import annotations

import math

from torch import Tensor, nn

from ..nn import DEFAULT_MAX_BIT, QuantConv2d, QuantLinear

TRUNKS = ("nature", "minatar")
HEADS = ("actors", "critics")  # module names to exclude from BLIP/EWC


def make_trunk(kind: str, in_channels: int, *, F_prior: float, max_bit: int = DEFAULT_MAX_BIT
               ) -> tuple[nn.Sequential, int]:
    """(trunk, feature width). ``nature``: the Nature-DQN CNN on 84x84 (3 convs + 512
    linear); ``minatar``: a smaller 3x3-conv net for 10x10 boards (16-16-32 channels,
    no padding: 10->8->6->4, then 128)."""
    q = {"F_prior": F_prior, "max_bit": max_bit}
    if kind == "nature":
        layers: list[nn.Module] = [
            QuantConv2d(in_channels, 32, 8, 4, **q), nn.ReLU(),
            QuantConv2d(32, 64, 4, 2, **q), nn.ReLU(),
            QuantConv2d(64, 64, 3, 1, **q), nn.ReLU(), nn.Flatten(),
            QuantLinear(64 * 7 * 7, 512, **q), nn.ReLU(),
        ]
        return nn.Sequential(*layers), 512
    if kind == "minatar":
        layers = [
            QuantConv2d(in_channels, 16, 3, 1, **q), nn.ReLU(),
            QuantConv2d(16, 16, 3, 1, **q), nn.ReLU(),
            QuantConv2d(16, 32, 3, 1, **q), nn.ReLU(), nn.Flatten(),
            QuantLinear(32 * 4 * 4, 128, **q), nn.ReLU(),
        ]
        return nn.Sequential(*layers), 128
    raise ValueError(f"trunk must be one of {TRUNKS}; got {kind!r}")


def _head(width: int, out: int, gain: float) -> nn.Linear:
    # PPO's usual head init: orthogonal, small gain for the policy (near-uniform start)
    layer = nn.Linear(width, out)
    nn.init.orthogonal_(layer.weight, gain)
    nn.init.zeros_(layer.bias)
    return layer


class ActorCritic(nn.Module):
    """``forward(obs, game) -> (logits, value)``; ``obs`` uint8 ``(N, C, H, W)``."""

    def __init__(self, trunk: nn.Module, width: int, n_actions: list[int],
                 obs_scale: float) -> None:
        super().__init__()
        self.trunk = trunk
        self.actors = nn.ModuleList(_head(width, n, 0.01) for n in n_actions)
        self.critics = nn.ModuleList(_head(width, 1, 1.0) for _ in n_actions)
        self.obs_scale = obs_scale
        self.n_actions = list(n_actions)

    def features(self, obs: Tensor) -> Tensor:
        return self.trunk(obs.float() * self.obs_scale)

    def forward(self, obs: Tensor, game: int) -> tuple[Tensor, Tensor]:
        h = self.features(obs)
        return self.actors[game](h), self.critics[game](h).squeeze(-1)

    def policy_logits(self, obs: Tensor, game: int) -> Tensor:
        return self.actors[game](self.features(obs))


def build_agent(suite: str, n_actions: list[int], *, F_prior: float,
                max_bit: int = DEFAULT_MAX_BIT) -> ActorCritic:
    from .envs import obs_shape

    c = obs_shape(suite)[0]
    kind, scale = ("minatar", 1.0) if suite == "minatar5" else ("nature", 1.0 / 255.0)
    trunk, width = make_trunk(kind, c, F_prior=F_prior, max_bit=max_bit)
    return ActorCritic(trunk, width, n_actions, scale)


def count_params(module: nn.Module) -> int:
    return sum(math.prod(p.shape) for p in module.parameters())


__all__ = ["HEADS", "TRUNKS", "ActorCritic", "build_agent", "count_params", "make_trunk"]

