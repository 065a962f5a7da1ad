"""PPO (clipped surrogate, clipped value loss, entropy bonus, GAE), as CleanRL's
``ppo_atari``: rollout collection, advantages and the update, with hooks for the
continual-learning methods (an extra loss term, a call after every optimizer step).

Randomness: action sampling and minibatch shuffles draw from one explicit
``torch.Generator`` (checkpointed by the runner), never from the global RNG.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import validate
from .agent import ActorCritic
from .envs import VecEnv


@dataclass
class PPOConfig:
    """Defaults: the published setup (Atari PPO of the BLIP paper / CleanRL)."""

    lr: float = 2.5e-4
    clip: float = 0.1
    n_steps: int = 125  # per env and rollout (16 envs x 125 = 2000 samples)
    n_minibatches: int = 8
    epochs: int = 4
    gamma: float = 0.99
    gae_lambda: float = 0.95
    ent_coef: float = 0.01
    vf_coef: float = 0.5
    max_grad_norm: float = 0.5
    adam_eps: float = 1e-5
    anneal_lr: bool = True  # linear decay to 0 over each game's updates

    def validate(self) -> None:
        pos = {"lr": self.lr, "clip": self.clip, "max_grad_norm": self.max_grad_norm,
               "adam_eps": self.adam_eps}
        for k, v in pos.items():  # finite in float32, not bools (blip.validate)
            validate.number(k, v, lo=0.0, lo_open=True)
        for k in ("n_steps", "n_minibatches", "epochs"):
            validate.number(k, getattr(self, k), lo=1, integer=True)
        for k in ("gamma", "gae_lambda"):
            validate.number(k, getattr(self, k), lo=0.0, hi=1.0)
        for k in ("ent_coef", "vf_coef"):
            validate.number(k, getattr(self, k), lo=0.0)
        if not isinstance(self.anneal_lr, bool):
            raise ValueError(f"anneal_lr must be True or False; got {self.anneal_lr!r}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Rollout:
    obs: Tensor  # uint8 (T, N, C, H, W)
    actions: Tensor  # int64 (T, N)
    logprobs: Tensor  # (T, N)
    values: Tensor  # (T, N)
    rewards: Tensor  # clipped, (T, N)
    dones: Tensor  # float (T, N): obs[t] starts a new segment (done before it)
    next_obs: Tensor  # (N, C, H, W)
    next_done: Tensor  # (N,)

    @property
    def n_samples(self) -> int:
        return self.actions.numel()


@torch.no_grad()
def act(model: ActorCritic, obs: Tensor, game: int, generator: torch.Generator
        ) -> tuple[Tensor, Tensor, Tensor]:
    """Sampled actions, their log-probs and the values."""
    logits, value = model(obs, game)
    logp_all = F.log_softmax(logits, dim=-1)
    action = torch.multinomial(logp_all.exp(), 1, generator=generator).squeeze(-1)
    return action, logp_all.gather(-1, action[:, None]).squeeze(-1), value


@torch.no_grad()
def collect(model: ActorCritic, env: VecEnv, game: int, obs: np.ndarray, done: np.ndarray,
            n_steps: int, generator: torch.Generator, device: torch.device
            ) -> tuple[Rollout, np.ndarray, np.ndarray]:
    """``n_steps`` vectorised steps from ``(obs, done)``; returns the rollout and the
    state to continue from. Rewards are clipped to their sign for learning."""
    n = env.num_envs
    buf_obs = torch.empty((n_steps, n, *env.obs_shape), dtype=torch.uint8, device=device)
    actions = torch.empty((n_steps, n), dtype=torch.int64, device=device)
    logprobs = torch.empty((n_steps, n), device=device)
    values = torch.empty((n_steps, n), device=device)
    rewards = torch.empty((n_steps, n), device=device)
    dones = torch.empty((n_steps, n), device=device)
    was = model.training
    model.eval()
    for t in range(n_steps):
        o = torch.from_numpy(obs).to(device)
        buf_obs[t] = o
        dones[t] = torch.from_numpy(done.astype(np.float32)).to(device)
        a, lp, v = act(model, o, game, generator)
        actions[t], logprobs[t], values[t] = a, lp, v
        step = env.step(a.cpu().numpy())
        rewards[t] = torch.from_numpy(np.sign(step.reward)).to(device)
        obs, done = step.obs, step.done
    model.train(was)
    nxt_obs = torch.from_numpy(obs).to(device)
    nxt_done = torch.from_numpy(done.astype(np.float32)).to(device)
    return Rollout(buf_obs, actions, logprobs, values, rewards, dones, nxt_obs, nxt_done), obs, done


@torch.no_grad()
def gae(rewards: Tensor, values: Tensor, dones: Tensor, next_value: Tensor, next_done: Tensor,
        gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation; returns (advantages, returns)."""
    T = rewards.shape[0]
    adv = torch.zeros_like(rewards)
    last = torch.zeros_like(next_value)
    for t in reversed(range(T)):
        if t == T - 1:
            nonterminal, nxt = 1.0 - next_done, next_value
        else:
            nonterminal, nxt = 1.0 - dones[t + 1], values[t + 1]
        delta = rewards[t] + gamma * nxt * nonterminal - values[t]
        last = delta + gamma * lam * nonterminal * last
        adv[t] = last
    return adv, adv + values


@dataclass
class Batch:
    """A flattened rollout with advantages and returns."""

    obs: Tensor
    actions: Tensor
    logprobs: Tensor
    values: Tensor
    advantages: Tensor
    returns: Tensor

    def __len__(self) -> int:
        return self.actions.shape[0]

    def index(self, idx: Tensor) -> Batch:
        return Batch(self.obs[idx], self.actions[idx], self.logprobs[idx], self.values[idx],
                     self.advantages[idx], self.returns[idx])


def make_batch(model: ActorCritic, ro: Rollout, game: int, cfg: PPOConfig) -> Batch:
    with torch.no_grad():
        _, next_value = model(ro.next_obs, game)
    adv, ret = gae(ro.rewards, ro.values, ro.dones, next_value, ro.next_done, cfg.gamma,
                   cfg.gae_lambda)
    return Batch(ro.obs.flatten(0, 1), ro.actions.flatten(), ro.logprobs.flatten(),
                 ro.values.flatten(), adv.flatten(), ret.flatten())


def ppo_loss(model: ActorCritic, game: int, mb: Batch, cfg: PPOConfig
             ) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped surrogate + 0.5·clipped value loss·vf_coef − ent_coef·entropy."""
    logits, value = model(mb.obs, game)
    logp_all = F.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, mb.actions[:, None]).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1).mean()
    ratio = (logp - mb.logprobs).exp()
    adv = mb.advantages
    if len(adv) > 1:  # per-minibatch normalisation, as CleanRL
        adv = (adv - adv.mean()) / (adv.std() + 1e-8)
    pg = torch.max(-adv * ratio, -adv * ratio.clamp(1 - cfg.clip, 1 + cfg.clip)).mean()
    v_clipped = mb.values + (value - mb.values).clamp(-cfg.clip, cfg.clip)
    v_loss = 0.5 * torch.max((value - mb.returns) ** 2, (v_clipped - mb.returns) ** 2).mean()
    loss = pg - cfg.ent_coef * entropy + cfg.vf_coef * v_loss
    with torch.no_grad():
        clipfrac = ((ratio - 1).abs() > cfg.clip).float().mean()
    return loss, {"pg_loss": pg.detach(), "v_loss": v_loss.detach(),
                  "entropy": entropy.detach(), "clipfrac": clipfrac}


def ppo_update(model: ActorCritic, game: int, batch: Batch, optimizer: torch.optim.Optimizer,
               cfg: PPOConfig, generator: torch.Generator, *,
               extra_loss: Callable[[], Tensor | None] | None = None,
               after_step: Callable[[], object] | None = None,
               params: list[nn.Parameter] | None = None) -> dict[str, float]:
    """``cfg.epochs`` passes of ``cfg.n_minibatches`` shuffled minibatches: Adam step,
    gradient-norm clipping over ``params`` (default: the optimizer's), then
    ``after_step()`` (BLIP's projection)."""
    if params is None:
        params = [p for g in optimizer.param_groups for p in g["params"]]
    n = len(batch)
    mb_size = max(1, n // cfg.n_minibatches)
    sums: dict[str, Tensor] = {}  # summed as tensors: one device sync at the end
    count = 0
    for _ in range(cfg.epochs):
        order = torch.randperm(n, generator=generator, device=generator.device)
        order = order.to(batch.actions.device)
        for s in range(0, mb_size * cfg.n_minibatches, mb_size):
            mb = batch.index(order[s:s + mb_size])
            loss, stats = ppo_loss(model, game, mb, cfg)
            if extra_loss is not None:
                penalty = extra_loss()
                if penalty is not None:
                    loss = loss + penalty
                    stats["penalty"] = penalty.detach()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            if after_step is not None:
                after_step()
            stats["loss"] = loss.detach()
            for k, v in stats.items():
                sums[k] = sums[k] + v if k in sums else v.detach().clone()
            count += 1
    return {k: float(v) / count for k, v in sums.items()}


__all__ = ["Batch", "PPOConfig", "Rollout", "act", "collect", "gae", "make_batch", "ppo_loss",
           "ppo_update"]
