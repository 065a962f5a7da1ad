"""Evaluation: play each game seen so far for K episodes with fixed seeds; the reward
matrix (raw scores, and normalised by the score right after training that game)."""

from __future__ import annotations

import math

import numpy as np
import torch

from .agent import ActorCritic
from .envs import make_env
from .ppo import act


@torch.no_grad()
def play(model: ActorCritic, suite: str, games: tuple[str, ...], game: int, *, episodes: int,
         seed: int, device: torch.device, max_steps: int, gif_frames: int = 0
         ) -> tuple[list[float], list[np.ndarray]]:
    """Raw returns of ``episodes`` whole games (one per sub-env, all seeded from ``seed``;
    an episode cut at ``max_steps`` agent steps counts its score so far) and up to
    ``gif_frames`` RGB frames of the first one. Actions are sampled from the policy
    with a generator seeded from ``seed``, so the result is reproducible."""
    env = make_env(suite, games[game], episodes, seed, training=False, max_episode_steps=max_steps)
    gen = torch.Generator(device=device).manual_seed(seed)
    was = model.training
    model.eval()
    frames: list[np.ndarray] = []
    returns: list[float | None] = [None] * episodes
    score = np.zeros(episodes)
    try:
        obs = env.reset()
        for _ in range(max_steps + 1):
            if len(frames) < gif_frames and returns[0] is None:
                frames.append(env.frame(obs, 0))
            a, _, _ = act(model, torch.from_numpy(obs).to(device), game, gen)
            step = env.step(a.cpu().numpy())
            score += step.reward
            for i in np.flatnonzero(step.episode_over):
                if returns[i] is None:
                    returns[i] = float(score[i])
            obs = step.obs
            if all(r is not None for r in returns):
                break
    finally:
        env.close()
        model.train(was)
    return [float(score[i]) if r is None else r for i, r in enumerate(returns)], frames


def normalise(raw: np.ndarray) -> np.ndarray:
    """``raw[i, j] / |raw[j, j]|``: 1 = the score right after learning game j. The
    absolute value keeps "higher is better" for games with negative scores (Boxing);
    NaN where ``raw[j, j]`` is 0 (undefined) or not played yet."""
    out = np.full_like(raw, np.nan)
    for j in range(raw.shape[1]):
        d = raw[j, j]
        if not (math.isnan(d) or d == 0):
            out[:, j] = raw[:, j] / abs(d)
    return out


__all__ = ["normalise", "play"]
