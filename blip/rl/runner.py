"""The continual-RL run: learn a suite's games in sequence with PPO and a method,
evaluate every game seen so far after each one, write a run directory.

Run directory (``--out``)::

    config.json                     the RLConfig
    results.json                    matrices, per-game stats and timings, summary
    reward_matrix.{csv,json}        raw[i, j]: mean raw score on game j after game i
    reward_matrix_norm.{csv,json}   raw[i, j] / |raw[j, j]| (1 = right after training j)
    reward_matrix.png, learning_curves.png
    gifs/after{i}_game{j}.gif, gifs/grid.gif   (row i = after game i, column j = game j)
    checkpoint.pt                   after every game and every ``checkpoint_every`` updates

Determinism: the agent is initialised under ``torch.manual_seed(seed)``; game ``g``
gets its own env seed, action/minibatch generator and Fisher generator derived from
``(seed, g)``, and evaluation of game ``j`` always uses the same seeds. A run
resumed at a game boundary therefore ends with the same reward matrix as an
uninterrupted one. Mid-game checkpoints hold the optimizer, the generator and (for
MinAtar) the envs' state as plain data (:mod:`blip.rl.envstate`, no pickle), so
MinAtar resumes exactly mid-game too; ale-py's vector
env cannot be saved, so an Atari run resumed mid-game restarts that game's episodes
from fresh seeded resets (the weights and optimizer carry on).
"""

from __future__ import annotations

import json
import pickle
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import validate
from ..nn import DEFAULT_MAX_BIT, load_state_dict_atomic
from ..runs import checkpoint as ckpt
from ..runs.backend_info import kernel_backend
from ..runs.metrics import matrix_from_list, matrix_to_list
from ..runs.rundir import RUNS_ROOT, Progress, Runner, matrix_csv, plural, run_name
from ..runs.safeload import trusting
from ..runs.seeds import derive_seed
from .agent import ActorCritic, build_agent, count_params
from .envs import (
    DEFAULT_MAX_EPISODE_STEPS,
    MinAtarVecEnv,
    VecEnv,
    action_counts,
    check_suite,
    default_threads,
    make_env,
)
from .envstate import dump_minatar, load_minatar
from .evaluate import normalise, play
from .methods import METHODS, RLMethod, make_method
from .ppo import PPOConfig, collect, make_batch, ppo_update

CHECKPOINT = "checkpoint.pt"
CKPT_VERSION = 1
CHECKPOINT_KEYS = ("config", "state", "model", "method")
#: the published per-game budget on a GPU; CPU runs pass --steps
DEFAULT_STEPS = {"atari6": 10_000_000, "minatar5": 1_000_000}
#: `blip rl --smoke`: two games, two short rollouts each, one short eval episode; the
#: settings a user does not give. A two-game MinAtar run takes seconds on 2 CPU cores.
SMOKE: dict[str, Any] = {"games": 2, "envs": 4, "n_steps": 64, "steps": 512,
                         "eval_episodes": 1, "eval_max_steps": 200, "gif_frames": 8,
                         "checkpoint_every": 0}


@dataclass
class RLConfig:
    suite: str = "minatar5"
    method: str = "blip"
    # env steps per game (all envs together; None: DEFAULT_STEPS), rounded down to whole
    # rollouts of envs * ppo.n_steps; at least one rollout
    steps: int | None = None
    envs: int = 16
    games: int | None = None  # learn only the first N games of the suite
    seed: int = 0
    device: str = "cpu"
    # torch intra-op threads (and ALE worker threads); None: envs.default_threads(suite)
    threads: int | None = None
    F_prior: float = 5e-18
    max_bit: int = DEFAULT_MAX_BIT
    lamb: float = 5000.0  # EWC's lambda
    eval_episodes: int = 8
    eval_max_steps: int | None = None  # None: the suite's episode cap
    gif_frames: int = 60
    checkpoint_every: int = 50  # updates between mid-game checkpoints (0: games only)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    trust_pickles: bool = False  # load old checkpoints holding pickles (blip.runs.safeload)

    # What changes the numbers a run produces: a resume must match them.
    RESULT_KEYS = ("suite", "method", "steps", "envs", "games", "seed", "F_prior", "max_bit",
                   "lamb", "eval_episodes", "eval_max_steps", "ppo")

    def game_names(self) -> tuple[str, ...]:
        games = check_suite(self.suite)
        return games[: self.games] if self.games else games

    def steps_per_game(self) -> int:
        return self.steps if self.steps is not None else DEFAULT_STEPS[self.suite]

    def rollout_steps(self) -> int:
        """Env steps of one rollout (one PPO update): ``envs * ppo.n_steps``."""
        return self.envs * self.ppo.n_steps

    def n_updates(self) -> int:
        """Whole rollouts per game: ``steps`` rounded down (``validate`` asks for >= 1)."""
        return self.steps_per_game() // self.rollout_steps()

    def actual_steps_per_game(self) -> int:
        """The env steps a game really runs: ``n_updates() * rollout_steps()``, which is
        ``steps`` rounded down to whole rollouts."""
        return self.n_updates() * self.rollout_steps()

    def validate(self) -> None:
        games = check_suite(self.suite)
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}; got {self.method!r}")
        ints = {"envs": (self.envs, 1), "eval_episodes": (self.eval_episodes, 1),
                "gif_frames": (self.gif_frames, 0), "checkpoint_every": (self.checkpoint_every, 0),
                "max_bit": (self.max_bit, 1)}
        for k, (v, lo) in ints.items():  # ints, not bools (blip.validate)
            validate.number(k, v, lo=lo, integer=True)
        validate.optional_int("steps", self.steps, 1)
        if self.games is not None:
            validate.number("games", self.games, lo=1, hi=len(games), integer=True)
        validate.optional_int("eval_max_steps", self.eval_max_steps, 1)
        validate.optional_int("threads", self.threads, 1, hi=validate.MAX_THREADS)
        validate.number("seed", self.seed, lo=0, hi=validate.MAX_SEED, integer=True)
        validate.positive32("F_prior", self.F_prior)
        validate.number("lamb", self.lamb, lo=0.0)  # finite in float32
        if re.fullmatch(r"cpu|cuda(:\d+)?", self.device) is None:
            raise ValueError(f"device must be cpu, cuda or cuda:N; got {self.device!r}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device={self.device!r} but CUDA is not available here")
        self.ppo.validate()
        if self.steps_per_game() < self.rollout_steps():
            raise ValueError(
                f"steps must be at least one rollout, envs * n_steps = {self.envs} * "
                f"{self.ppo.n_steps} = {self.rollout_steps()}; got {self.steps_per_game()} "
                f"(raise steps or lower envs / n_steps)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __post_init__(self) -> None:
        if not isinstance(self.ppo, PPOConfig):
            raise ValueError(f"ppo must be a PPOConfig; got {self.ppo!r}")


@dataclass
class _Game:
    """One game's training state between updates (what a mid-game checkpoint holds)."""

    params: list[torch.nn.Parameter]
    opt: torch.optim.Optimizer
    gen: torch.Generator
    env: VecEnv
    obs: Any
    done: np.ndarray
    start: int = 0  # the first update to run
    train_seconds: float = 0.0


class RLRunner(Runner):
    cfg: RLConfig

    def __init__(self, cfg: RLConfig, out: str | Path, *, quiet: bool = False,
                 plots: bool = True, progress: bool | None = None,
                 hooks: Sequence[Any] = ()) -> None:
        super().__init__(cfg, out, quiet, plots, progress)
        self.games = list(cfg.game_names())
        # torch's default (every core) is up to 16x slower here: see default_threads
        self.threads = cfg.threads or default_threads(cfg.suite)
        if cfg.threads is None and self.device.type == "cpu":
            torch.set_num_threads(self.threads)
        # observers (TensorBoard): optional on_update / on_game / close
        self.hooks = list(hooks)

    def _emit(self, event: str, *args: Any) -> None:
        for h in self.hooks:
            if hasattr(h, event):
                getattr(h, event)(*args)

    # -- pieces -------------------------------------------------------------------------

    def _env(self, game: int, *extra: int) -> VecEnv:
        cfg = self.cfg
        return make_env(cfg.suite, self.games[game], cfg.envs,
                        derive_seed(cfg.seed, game, 1, *extra, bits=31), training=True,
                        num_threads=cfg.threads or 0)

    def _generator(self, *parts: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(derive_seed(*parts, bits=31))

    def _eval_max_steps(self) -> int:
        return self.cfg.eval_max_steps or DEFAULT_MAX_EPISODE_STEPS[self.cfg.suite]

    def _save(self, state: dict[str, Any]) -> None:
        ckpt.save_atomic(state, self.out / CHECKPOINT)

    def _write_outputs(self, st: dict[str, Any], done: bool) -> dict[str, Any]:
        raw = matrix_from_list(st["raw"])
        norm = normalise(raw)
        n = len(self.games)
        last = st["games_done"] - 1
        final = norm[last, : last + 1] if last >= 0 else np.array([])
        results = {
            "suite": self.cfg.suite, "method": self.cfg.method, "games": self.games,
            "games_done": st["games_done"], "complete": done,
            "reward_matrix": st["raw"], "reward_matrix_norm": matrix_to_list(norm),
            "norm_note": "raw[i, j] / |raw[j, j]|; null where raw[j, j] is 0 or unseen",
            "final_mean_norm": (float(np.nanmean(final)) if np.isfinite(final).any()
                                else None),
            "final_raw": [None if np.isnan(v) else float(v) for v in raw[last]] if last >= 0
            else [],
            "per_game": st["records"],
            "total_seconds": sum(r["seconds"] for r in st["records"]),
            # the env steps each game really runs (steps rounded down to whole rollouts)
            "steps_per_game": self.cfg.actual_steps_per_game(),
            "steps_requested": self.cfg.steps_per_game(),
            "updates_per_game": self.cfg.n_updates(),
            "config": self.cfg.to_dict(), "torch": torch.__version__, "device": str(self.device),
            "kernel_backend": kernel_backend(self.device),
            "torch_threads": torch.get_num_threads(),
        }
        self.out.mkdir(parents=True, exist_ok=True)
        ckpt.write_text_atomic(self.out / "config.json", json.dumps(self.cfg.to_dict(), indent=1))
        ckpt.write_text_atomic(self.out / "results.json", json.dumps(results, indent=1))
        for name, m in (("reward_matrix", raw), ("reward_matrix_norm", norm)):
            ckpt.write_text_atomic(self.out / f"{name}.json", json.dumps(matrix_to_list(m)))
            ckpt.write_text_atomic(self.out / f"{name}.csv",
                                   matrix_csv(m, "after_game", self.games, self.games, ".6g"))
        if self.plots:
            from . import plots

            try:
                plots.reward_heatmap(norm[:n], raw[:n], self.games, self.out / "reward_matrix.png",
                                     f"{self.cfg.suite} / {self.cfg.method}")
                curves = [[tuple(x) for x in c] for c in st["curves"]]
                plots.learning_curves(curves, self.games, self.out / "learning_curves.png")
            except ImportError as e:  # pragma: no cover - matplotlib missing
                self.log(f"plots skipped: {e}")
        return results

    def _write_grid(self) -> None:
        from PIL import Image, ImageSequence

        from .gifs import grid_frames, write_gif

        clips = {}
        for path in sorted((self.out / "gifs").glob("after*_game*.gif")):
            m = re.fullmatch(r"after(\d+)_game(\d+)\.gif", path.name)
            if m:
                with Image.open(path) as im:
                    clips[(int(m[1]), int(m[2]))] = [np.asarray(f.convert("RGB"))
                                                     for f in ImageSequence.Iterator(im)]
        write_gif(grid_frames(clips, len(self.games)), self.out / "gifs" / "grid.gif")

    # -- the run ------------------------------------------------------------------------

    def _start(self, model: ActorCritic, method: RLMethod, resume: bool
               ) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """The run state (and a mid-game checkpoint's part), fresh or from the checkpoint."""
        n_games = len(self.games)
        path = self.out / CHECKPOINT
        validate.writable_dir(self.out, "out directory")  # before any game is learned
        if resume and path.is_file():
            c = ckpt.load(path, map_location=self.device, required=CHECKPOINT_KEYS,
                          trust_pickles=self.cfg.trust_pickles)
            self._check_compatible(c["config"])
            load_state_dict_atomic(model, c["model"])
            method.load_state_dict(c["method"])
            mid = c.get("mid")
            where = (f"in game {c['state']['games_done']} at update {mid['update']}" if mid
                     else f"after {plural(c['state']['games_done'], 'game')}")
            self.log(f"resuming {self.out} {where}")
            return c["state"], mid
        if resume:
            self.log(f"no checkpoint in {self.out}; starting from scratch")
        return {"games_done": 0, "raw": matrix_to_list(np.full((n_games,) * 2, np.nan)),
                "curves": [[] for _ in range(n_games)], "records": []}, None

    def _open_game(self, g: int, method: RLMethod, mid: dict[str, Any] | None) -> _Game:
        """Game ``g``'s optimizer, generator and envs: fresh, or where ``mid`` left them."""
        cfg = self.cfg
        params = method.trainable(g)
        opt = torch.optim.Adam(params, lr=cfg.ppo.lr, eps=cfg.ppo.adam_eps)
        gen = self._generator(cfg.seed, g, 2)
        if mid is None:
            env = self._env(g)
            return _Game(params, opt, gen, env, env.reset(), np.zeros(cfg.envs, dtype=bool))
        opt.load_state_dict(mid["optimizer"])
        gen.set_state(mid["generator"].to(gen.get_state().device))
        start = mid["update"]
        if mid["env"] is not None:
            env = self._restore_env(mid["env"])
            obs, done = mid["obs"], mid["done"]
        else:
            self.log("ale-py's vector env cannot be checkpointed: this game's "
                     "episodes restart from seeded resets")
            env = self._env(g, start)
            obs, done = env.reset(), np.zeros(cfg.envs, dtype=bool)
        return _Game(params, opt, gen, env, obs, done, start, mid["train_seconds"])

    def _mid_checkpoint(self, st: dict[str, Any], model: ActorCritic, method: RLMethod,
                        game: _Game, update: int, train_seconds: float) -> None:
        env = game.env
        self._save({
            "version": CKPT_VERSION, "config": self.cfg.to_dict(), "state": st,
            "model": model.state_dict(), "method": method.state_dict(),
            "mid": {"update": update, "optimizer": game.opt.state_dict(),
                    "generator": game.gen.get_state(), "train_seconds": train_seconds,
                    "env": dump_minatar(env) if isinstance(env, MinAtarVecEnv) else None,
                    "obs": game.obs, "done": game.done},
        })

    def _train_game(self, g: int, model: ActorCritic, method: RLMethod, game: _Game,
                    st: dict[str, Any], total_updates: int, stop_after_updates: int | None
                    ) -> tuple[Any, int]:
        """PPO updates of game ``g`` from ``game.start``; returns the last batch (None when
        stopped after a mid-game checkpoint, see :meth:`run`) and the run's update count."""
        cfg, n_updates = self.cfg, self.cfg.n_updates()
        curve = st["curves"][g]
        bar = Progress(n_updates, f"{self.games[g]} ({g + 1}/{len(self.games)})",
                       self.progress, initial=game.start, unit="upd")
        batch = None
        t_train = time.perf_counter()
        try:
            for u in range(game.start, n_updates):
                if cfg.ppo.anneal_lr:
                    for group in game.opt.param_groups:
                        group["lr"] = cfg.ppo.lr * (1.0 - u / n_updates)
                ro, game.obs, game.done = collect(model, game.env, g, game.obs, game.done,
                                                  cfg.ppo.n_steps, game.gen, self.device)
                batch = make_batch(model, ro, g, cfg.ppo)
                stats = ppo_update(model, g, batch, game.opt, cfg.ppo, game.gen,
                                   params=game.params, extra_loss=method.penalty,
                                   after_step=method.after_step)
                step_base = (u + 1) * cfg.envs * cfg.ppo.n_steps
                curve.extend([step_base, r] for r, _ in game.env.drain())
                recent = [r for _, r in curve[-10:]]
                bar.update(ret=f"{np.mean(recent):.1f}" if recent else "-",
                           loss=f"{stats['loss']:.3f}")
                self._emit("on_update", total_updates,
                           float(np.mean(recent)) if recent else None, float(stats["loss"]))
                total_updates += 1
                every = cfg.checkpoint_every
                if every and (u + 1) % every == 0 and u + 1 < n_updates:
                    self._mid_checkpoint(st, model, method, game, u + 1, game.train_seconds
                                         + time.perf_counter() - t_train)
                    if stop_after_updates is not None and total_updates >= stop_after_updates:
                        return None, total_updates
        finally:
            bar.close()
            game.env.close()
        game.train_seconds += time.perf_counter() - t_train
        return batch, total_updates

    def _end_game(self, g: int, model: ActorCritic, method: RLMethod, batch: Any,
                  st: dict[str, Any], train_seconds: float) -> np.ndarray:
        """The method's end of game, then every game so far played into ``st``'s matrix."""
        cfg, dev = self.cfg, self.device
        t1 = time.perf_counter()
        end = method.end_game(g, batch.obs, self._generator(cfg.seed, g, 3))
        t2 = time.perf_counter()
        raw = matrix_from_list(st["raw"])
        # evaluation can take longer than training on short runs: say so, show a bar
        self.log(f"evaluating {plural(g + 1, 'game')} x {plural(cfg.eval_episodes, 'episode')}"
                 f" (at most {self._eval_max_steps()} steps each)")
        bar = Progress(g + 1, f"eval after {self.games[g]}", self.progress, unit="game")
        for j in range(g + 1):
            returns, frames = play(
                model, cfg.suite, tuple(self.games), j, episodes=cfg.eval_episodes,
                seed=derive_seed(cfg.seed, j, 4, bits=31), device=dev,
                max_steps=self._eval_max_steps(), gif_frames=cfg.gif_frames)
            raw[g, j] = float(np.mean(returns))
            if cfg.gif_frames:
                from .gifs import write_gif

                write_gif(frames, self.out / "gifs" / f"after{g}_game{j}.gif")
            bar.update(game=self.games[j], ret=f"{raw[g, j]:.3g}")
        bar.close()
        t3 = time.perf_counter()
        curve = st["curves"][g]
        st["raw"] = matrix_to_list(raw)
        st["games_done"] = g + 1
        st["records"].append({
            "game": g, "name": self.games[g], "updates": cfg.n_updates(),
            "env_steps": cfg.actual_steps_per_game(),
            "episodes": len(curve), "train_seconds": train_seconds,
            "end_game_seconds": t2 - t1, "eval_seconds": t3 - t2,
            "seconds": train_seconds + (time.perf_counter() - t1),
            "steps_per_second": cfg.actual_steps_per_game() / train_seconds,
            "last_train_return": float(np.mean([r for _, r in curve[-10:]])) if curve
            else None,
            "method": ckpt.jsonable(end),
        })
        return raw

    def run(self, resume: bool = False, stop_after_updates: int | None = None) -> dict[str, Any]:
        """Learn every game; ``stop_after_updates`` (tests) returns right after the
        checkpoint written at that many updates into the run, as a kill would."""
        cfg, dev = self.cfg, self.device
        n_games, n_updates = len(self.games), cfg.n_updates()
        torch.manual_seed(cfg.seed)
        model = build_agent(cfg.suite, action_counts(cfg.suite, n_games), F_prior=cfg.F_prior,
                            max_bit=cfg.max_bit).to(dev)
        method = make_method(cfg.method, model, F_prior=cfg.F_prior, max_bit=cfg.max_bit,
                             lamb=cfg.lamb)
        st, mid = self._start(model, method, resume)
        actual = cfg.actual_steps_per_game()
        if actual != cfg.steps_per_game():
            self.log(f"steps {cfg.steps_per_game()} is not a multiple of envs * n_steps = "
                     f"{cfg.rollout_steps()}: each game runs {actual} env steps "
                     f"({plural(n_updates, 'whole rollout')})")
        self.log(f"{cfg.suite} / {cfg.method}: {plural(n_games, 'game')} {self.games}, "
                 f"{actual} steps/game ({plural(n_updates, 'update')} of {cfg.envs}x"
                 f"{cfg.ppo.n_steps}), trunk {count_params(model.trunk)} params, device {dev}, "
                 f"kernels {kernel_backend(dev)}, {plural(torch.get_num_threads(), 'thread')}")
        total_updates = st["games_done"] * n_updates + (mid["update"] if mid else 0)

        for g in range(st["games_done"], n_games):
            t0 = time.perf_counter()
            game = self._open_game(g, method, mid)
            mid = None
            batch, total_updates = self._train_game(g, model, method, game, st, total_updates,
                                                    stop_after_updates)
            if batch is None:  # stopped after a mid-game checkpoint (n_updates >= 1)
                return {"stopped": True}
            raw = self._end_game(g, model, method, batch, st, game.train_seconds)
            self._save({"version": CKPT_VERSION, "config": cfg.to_dict(), "state": st,
                        "model": model.state_dict(), "method": method.state_dict(), "mid": None})
            self._write_outputs(st, done=g == n_games - 1)
            end = st["records"][-1]["method"]
            self._emit("on_game", g, [float(v) for v in raw[g, : g + 1]],
                       end.get("capacity") or {} if isinstance(end, dict) else {}, model)
            if cfg.gif_frames:
                self._write_grid()
            row = " ".join(f"{v:.3g}" for v in raw[g, : g + 1])
            self.log(f"game {g} ({self.games[g]}): {time.perf_counter() - t0:.1f}s, "
                     f"{st['records'][-1]['steps_per_second']:.0f} steps/s | reward {row}")
            if stop_after_updates is not None and total_updates >= stop_after_updates:
                return {"stopped": True}
        results = self._write_outputs(st, done=True)
        self._emit("close")
        mean = results["final_mean_norm"]
        self.log(f"mean normalised score after all games: "
                 f"{'n/a' if mean is None else f'{mean:.3f}'} -> {self.out}")
        return results

    def _check_compatible(self, saved: dict[str, Any]) -> None:
        ckpt.check_resumable(saved, self.cfg.to_dict(), RLConfig.RESULT_KEYS,
                             self.out / CHECKPOINT)

    def _restore_env(self, saved: Any) -> MinAtarVecEnv:
        """The mid-game env of a checkpoint: plain data; a pickle (blip < this format)
        only when trusted, as the whole file then was."""
        path = self.out / CHECKPOINT
        if isinstance(saved, bytes):
            if not trusting(self.cfg.trust_pickles):
                raise ValueError(f"checkpoint {path} holds a pickled env; pass --trust-pickles "
                                 "only if you trust it, or resume without it from a fresh run")
            return pickle.loads(saved)  # noqa: S301 - the user trusts this file
        try:
            return load_minatar(saved)
        except ValueError as e:
            raise ValueError(f"checkpoint {path}: {e}") from None


def default_run_dir(cfg: RLConfig) -> Path:
    return RUNS_ROOT / run_name("rl", cfg.suite, cfg.method, seed=cfg.seed)


def run_rl(cfg: RLConfig, out: str | Path | None = None, *, resume: bool = False,
           quiet: bool = False, plots: bool = True, hooks: Sequence[Any] = ()
           ) -> dict[str, Any]:
    """``hooks``: observers of updates and games, e.g. blip.runs.tensorboard.TensorBoardLog."""
    return RLRunner(cfg, out or default_run_dir(cfg), quiet=quiet, plots=plots,
                    hooks=hooks).run(resume)


__all__ = ["CHECKPOINT", "DEFAULT_STEPS", "SMOKE", "RLConfig", "RLRunner", "default_run_dir",
           "run_rl"]
