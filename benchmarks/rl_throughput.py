"""Throughput of the continual-RL pieces: ``python benchmarks/rl_throughput.py [--suite ...]``.

* env steps/s of the vectorised envs under random actions (ALE: ale-py's worker
  threads = ``--threads``);
* PPO update time per env step (one rollout of envs x n_steps samples, ``epochs``
  passes of ``n_minibatches`` Adam steps), plain (finetune) and with BLIP's
  projection after every step.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from blip.rl.agent import build_agent
from blip.rl.envs import SUITES, make_env
from blip.rl.methods import make_method
from blip.rl.ppo import PPOConfig, collect, make_batch, ppo_update


def env_throughput(suite: str, game: str, envs: int, threads: int, seconds: float = 3.0
                   ) -> float:
    env = make_env(suite, game, envs, 0, num_threads=threads)
    env.reset()
    rng = np.random.default_rng(0)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        env.step(rng.integers(0, env.n_actions, envs))
        n += envs
    rate = n / (time.perf_counter() - t0)
    env.close()
    return rate


def update_time(suite: str, method: str, envs: int, cfg: PPOConfig, repeats: int = 2) -> float:
    """Seconds per env step of the PPO update (collection excluded)."""
    game = SUITES[suite][0]
    env = make_env(suite, game, envs, 0, num_threads=1)
    torch.manual_seed(0)
    model = build_agent(suite, [env.n_actions], F_prior=5e-18)
    m = make_method(method, model, F_prior=5e-18, max_bit=20, lamb=5000.0)
    gen = torch.Generator().manual_seed(0)
    ro, _, _ = collect(model, env, 0, env.reset(), np.zeros(envs, bool), cfg.n_steps, gen,
                       torch.device("cpu"))
    env.close()
    if method == "blip":  # a game already ended: bits are frozen, projection does work
        m.end_game(0, ro.obs.flatten(0, 1), gen)
    params = m.trainable(0)
    opt = torch.optim.Adam(params, lr=cfg.lr, eps=cfg.adam_eps)
    batch = make_batch(model, ro, 0, cfg)
    ppo_update(model, 0, batch, opt, cfg, gen, params=params, after_step=m.after_step)  # warm
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        ppo_update(model, 0, batch, opt, cfg, gen, params=params, extra_loss=m.penalty,
                   after_step=m.after_step)
        best = min(best, time.perf_counter() - t0)
    return best / len(batch)


def projection_time(suite: str, repeats: int = 200) -> float:
    """Seconds of one BLIP projection of the whole trunk (what each Adam step adds)."""
    from blip.rl.agent import HEADS
    from blip.strategy import BLIP

    model = build_agent(suite, [6], F_prior=5e-18)
    strategy = BLIP(model, F_prior=5e-18, exclude=HEADS)
    for lay in strategy.layers.values():  # some frozen bits, so the kernel has work
        lay.bits_weight.random_(0, 8)
    strategy.project()
    t0 = time.perf_counter()
    for _ in range(repeats):
        strategy.project()
    return (time.perf_counter() - t0) / repeats


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python benchmarks/rl_throughput.py")
    p.add_argument("--suite", choices=sorted(SUITES), nargs="+", default=sorted(SUITES))
    p.add_argument("--envs", type=int, default=16)
    p.add_argument("--threads", type=int, default=2, help="ALE worker threads")
    p.add_argument("--torch-threads", type=int, default=1)
    p.add_argument("--epochs", type=int, default=4, help="PPO epochs timed (published: 4)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.torch_threads)
    cfg = PPOConfig(epochs=a.epochs)
    for suite in a.suite:
        game = SUITES[suite][0]
        rate = env_throughput(suite, game, a.envs, a.threads)
        print(f"{suite} {game}: {rate:,.0f} env steps/s ({a.envs} envs, {a.threads} threads)")
        proj = projection_time(suite)
        per_step = proj * cfg.epochs * cfg.n_minibatches / (a.envs * cfg.n_steps)
        print(f"{suite} BLIP projection of the trunk: {1e6 * proj:.0f} us per Adam step "
              f"= {1e6 * per_step:.1f} us per env step")
        for method in ("finetune", "blip"):
            t = update_time(suite, method, a.envs, cfg)
            print(f"{suite} PPO update, {method}: {1e6 * t:.0f} us per env step "
                  f"({a.envs}x{cfg.n_steps} samples, {cfg.epochs} epochs x "
                  f"{cfg.n_minibatches} minibatches, torch threads {a.torch_threads})",
                  flush=True)


if __name__ == "__main__":
    main()
