"""Vectorised game suites for continual RL: Atari (ale-py) and MinAtar.

Every suite exposes the same small interface (:class:`VecEnv`): ``reset()`` returns
uint8 observations ``(N, C, H, W)``; ``step(actions)`` returns the next
observations (already reset where an episode ended: "same-step" autoreset), the
*raw* reward, ``done`` (the bootstrap cut PPO uses: game over, time limit, and on
Atari also a lost life) and ``episode_over`` (a real end of game). Raw returns of
finished episodes are collected in ``finished`` (drained by the caller); learning
uses ``sign(reward)`` (reward clipping), evaluation the raw scores.

* ``atari6``: KungFuMaster, Boxing, Jamesbond, Krull, Riverraid, SpaceInvaders on
  ale-py's own C++ vector env with the DeepMind preprocessing of ``ALE/<Game>-v5``
  minus sticky actions: ``repeat_action_probability=0``, up to 30 no-op starts,
  frame skip 4 with max-pooling of the last two frames, 84x84 grayscale, a 4-frame
  stack, fire on reset where the game needs it, life loss as a bootstrap cut
  (training only; evaluation plays whole games), each game's minimal action set.
* ``minatar5``: Breakout, SpaceInvaders, Freeway, Asterix, Seaquest (MinAtar, no
  sticky actions). Observations are 10x10 with 4..10 game-specific channels; they
  are zero-padded to the suite's maximum (10, Seaquest's) so one trunk serves all
  games: a game's channels keep their own order, the extra ones stay 0. Each game
  keeps its minimal action set (3..6 actions).
"""

from __future__ import annotations

import logging
import os
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

SUITES: dict[str, tuple[str, ...]] = {
    "atari6": ("KungFuMaster", "Boxing", "Jamesbond", "Krull", "Riverraid", "SpaceInvaders"),
    "minatar5": ("Breakout", "SpaceInvaders", "Freeway", "Asterix", "Seaquest"),
}
MINATAR_CHANNELS = 10  # Seaquest's, the suite maximum: every game is padded to it
ATARI_FRAME_SKIP = 4
#: default episode caps in agent steps (Atari: the usual 108k frames / frame skip)
DEFAULT_MAX_EPISODE_STEPS = {"atari6": 27_000, "minatar5": 10_000}
#: ale-py's vector env takes ``autoreset_mode`` and ``life_loss_info`` from 0.12.1 on
ALE_PY_MIN_VERSION = (0, 12, 1)
INSTALL_RL = 'pip install -e ".[rl]"'
INSTALL_MINATAR = "pip install --no-deps minatar"


class MissingDependencyError(ValueError):
    """An optional dependency of a suite is missing or too old; the message says what
    to install. A ``ValueError`` so that the command line reports it like a bad
    argument (exit status 2) instead of a traceback."""


def version_tuple(version: str) -> tuple[int, ...]:
    """``"0.12.1"`` -> ``(0, 12, 1)``; stops at the first part without leading digits
    (``"0.12.1rc1"`` -> ``(0, 12, 1)``, ``"1.0.dev0"`` -> ``(1, 0)``)."""
    out = []
    for part in str(version).split("."):
        m = re.match(r"\d+", part)
        if m is None:
            break
        out.append(int(m.group()))
    return tuple(out)


def check_suite(suite: str) -> tuple[str, ...]:
    if suite not in SUITES:
        raise ValueError(f"suite must be one of {sorted(SUITES)}; got {suite!r}")
    return SUITES[suite]


def snake_case(game: str) -> str:
    """``KungFuMaster`` -> ``kung_fu_master`` (ALE ROM ids, MinAtar module names)."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", game).lower()


@dataclass
class Step:
    obs: np.ndarray  # uint8 (N, C, H, W), the reset observation where an episode ended
    reward: np.ndarray  # float32 (N,), raw game score of the step
    done: np.ndarray  # bool (N,), bootstrap cut: episode over, or (Atari training) life lost
    episode_over: np.ndarray  # bool (N,), game over or time limit


class VecEnv(ABC):
    """Common part: per-env raw-return tracking of finished episodes."""

    num_envs: int
    n_actions: int
    obs_shape: tuple[int, int, int]

    def _init_tracking(self) -> None:
        self._ep_return = np.zeros(self.num_envs, dtype=np.float64)
        self._ep_length = np.zeros(self.num_envs, dtype=np.int64)
        self.finished: list[tuple[float, int]] = []  # (raw return, length) per finished episode

    def _track(self, reward: np.ndarray, over: np.ndarray) -> None:
        self._ep_return += reward
        self._ep_length += 1
        for i in np.flatnonzero(over):
            self.finished.append((float(self._ep_return[i]), int(self._ep_length[i])))
            self._ep_return[i] = 0.0
            self._ep_length[i] = 0

    def drain(self) -> list[tuple[float, int]]:
        out, self.finished = self.finished, []
        return out

    @abstractmethod
    def reset(self) -> np.ndarray:
        """Reset every env; the stacked observations."""

    @abstractmethod
    def step(self, actions: np.ndarray) -> Step:
        """One step of every env (finished episodes reset in the same step)."""

    @abstractmethod
    def frame(self, obs: np.ndarray, i: int = 0) -> np.ndarray:
        """An RGB uint8 picture of env ``i`` from its observation (for GIFs)."""

    def close(self) -> None:  # noqa: B027 - optional: envs without resources need nothing
        return None


# -- MinAtar -------------------------------------------------------------------------------

# one colour per channel (Seaquest has the most: 10); background black
_PALETTE = np.array(
    [[0, 0, 0], [240, 240, 240], [230, 80, 60], [250, 200, 40], [70, 160, 250],
     [120, 220, 90], [200, 100, 230], [250, 140, 40], [60, 220, 210], [170, 170, 90],
     [255, 120, 170]], dtype=np.uint8)


def _import_minatar():  # noqa: ANN202
    # MinAtar logs a warning at import when seaborn (only used by its own display) is
    # missing; we render frames ourselves, so keep that out of the run's output.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        from minatar import Environment
    finally:
        root.setLevel(level)
    return Environment


class MinAtarVecEnv(VecEnv):
    """``num_envs`` MinAtar games stepped in a loop (they are cheap numpy code).

    Sub-env ``i`` draws from its own ``RandomState(seed + i)``; the whole object
    pickles (a mid-game checkpoint resumes the exact same episodes).
    """

    def __init__(self, game: str, num_envs: int, seed: int,
                 max_episode_steps: int = DEFAULT_MAX_EPISODE_STEPS["minatar5"]) -> None:
        try:
            Environment = _import_minatar()
        except ImportError as e:
            raise MissingDependencyError(
                f"the minatar5 suite needs MinAtar, which is not installed ({e}): "
                f"{INSTALL_MINATAR} (it needs only numpy)") from e
        if game not in SUITES["minatar5"]:
            raise ValueError(f"game must be one of {SUITES['minatar5']}; got {game!r}")
        self.game = game
        self.num_envs = num_envs
        self.max_episode_steps = max_episode_steps
        self.envs = []
        for i in range(num_envs):
            env = Environment(snake_case(game), sticky_action_prob=0.0)
            env.seed(int(seed) + i)
            self.envs.append(env)
        self.actions = np.asarray(self.envs[0].minimal_action_set(), dtype=np.int64)
        self.n_actions = len(self.actions)
        self.channels = self.envs[0].state_shape()[2]
        self.obs_shape = (MINATAR_CHANNELS, 10, 10)
        self._init_tracking()

    def _obs(self, i: int, out: np.ndarray) -> None:
        out[i, : self.channels] = np.moveaxis(self.envs[i].state(), 2, 0)

    def reset(self) -> np.ndarray:
        obs = np.zeros((self.num_envs, *self.obs_shape), dtype=np.uint8)
        for i, env in enumerate(self.envs):
            env.reset()
            self._obs(i, obs)
        self._init_tracking()
        return obs

    def step(self, actions: np.ndarray) -> Step:
        n = self.num_envs
        obs = np.zeros((n, *self.obs_shape), dtype=np.uint8)
        reward = np.zeros(n, dtype=np.float32)
        over = np.zeros(n, dtype=bool)
        for i, env in enumerate(self.envs):
            r, terminal = env.act(int(self.actions[actions[i]]))
            reward[i] = r
            over[i] = terminal or self._ep_length[i] + 1 >= self.max_episode_steps
        self._track(reward, over)
        for i, env in enumerate(self.envs):
            if over[i]:
                env.reset()
            self._obs(i, obs)
        return Step(obs, reward, over.copy(), over)

    def frame(self, obs: np.ndarray, i: int = 0, scale: int = 8) -> np.ndarray:
        # the highest active channel colours a cell (as MinAtar's own display)
        planes = obs[i].astype(np.int64) * np.arange(1, obs.shape[1] + 1)[:, None, None]
        img = _PALETTE[planes.max(axis=0)]
        return np.kron(img, np.ones((scale, scale, 1), dtype=np.uint8))


# -- Atari ---------------------------------------------------------------------------------


def _import_atari_vector_env():  # noqa: ANN202
    """ale-py's ``AtariVectorEnv``, or a :class:`MissingDependencyError` saying what to
    install (ale-py missing or older than :data:`ALE_PY_MIN_VERSION`, gymnasium missing)."""
    need = ".".join(map(str, ALE_PY_MIN_VERSION))
    try:
        import ale_py
    except ImportError as e:
        raise MissingDependencyError(
            f"the atari6 suite needs ale-py >= {need} (ROMs included) and gymnasium, and "
            f"ale-py is not installed ({e}): {INSTALL_RL}") from e
    installed = str(getattr(ale_py, "__version__", "unknown"))
    if version_tuple(installed) < ALE_PY_MIN_VERSION:
        raise MissingDependencyError(
            f"the atari6 suite needs ale-py >= {need} (its vector env with "
            f"autoreset_mode='SameStep' and life_loss_info); ale-py {installed} is "
            f"installed: {INSTALL_RL} (or pip install 'ale-py>={need}')")
    try:
        from ale_py.vector_env import AtariVectorEnv
    except ImportError as e:  # gymnasium missing (ale-py's vector env is built on it)
        raise MissingDependencyError(
            f"the atari6 suite needs gymnasium >= 1.0 next to ale-py {installed} ({e}): "
            f"{INSTALL_RL}") from e
    return AtariVectorEnv


class AtariVecEnv(VecEnv):
    """ale-py's threaded vector env with the DeepMind preprocessing (module doc).

    ``life_loss=True`` (training): a lost life is a bootstrap cut (``done``) but the
    game goes on; ``episode_over`` is only the real game over. ale-py reports both as
    ``terminated``; they are told apart by the lives counter: after a game over the
    env has already been reset (same-step autoreset) so the count did not drop.
    """

    def __init__(self, game: str, num_envs: int, seed: int, *, life_loss: bool = True,
                 num_threads: int = 0,
                 max_episode_steps: int = DEFAULT_MAX_EPISODE_STEPS["atari6"]) -> None:
        AtariVectorEnv = _import_atari_vector_env()
        self.game = game
        self.num_envs = num_envs
        self.seed = int(seed)
        self.life_loss = life_loss
        self.env = AtariVectorEnv(
            snake_case(game), num_envs, num_threads=num_threads,
            max_num_frames_per_episode=max_episode_steps * ATARI_FRAME_SKIP,
            repeat_action_probability=0.0, full_action_space=False,
            autoreset_mode="SameStep", img_height=84, img_width=84, grayscale=True,
            stack_num=4, frameskip=ATARI_FRAME_SKIP, maxpool=True, noop_max=30,
            episodic_life=False, life_loss_info=life_loss, reward_clipping=False,
            use_fire_reset=True,
        )
        self.n_actions = int(self.env.single_action_space.n)
        self.obs_shape = (4, 84, 84)
        self._lives = np.zeros(num_envs, dtype=np.int64)
        self._init_tracking()

    def reset(self) -> np.ndarray:
        obs, info = self.env.reset(seed=self.seed)
        self._lives = np.asarray(info["lives"], dtype=np.int64)
        self._init_tracking()
        return np.asarray(obs)

    def step(self, actions: np.ndarray) -> Step:
        obs, reward, term, trunc, info = self.env.step(np.asarray(actions, dtype=np.int64))
        lives = np.asarray(info["lives"], dtype=np.int64)
        term, trunc = np.asarray(term, bool), np.asarray(trunc, bool)
        life_lost = term & (lives < self._lives) if self.life_loss else np.zeros_like(term)
        over = trunc | (term & ~life_lost)
        self._lives = lives
        reward = np.asarray(reward, dtype=np.float32)
        self._track(reward, over)
        return Step(np.asarray(obs), reward, term | trunc, over)

    def frame(self, obs: np.ndarray, i: int = 0, scale: int = 1) -> np.ndarray:
        g = obs[i, -1]  # newest frame of the stack
        img = np.repeat(g[:, :, None], 3, axis=2)
        return np.kron(img, np.ones((scale, scale, 1), dtype=np.uint8)) if scale > 1 else img

    def close(self) -> None:
        self.env.close()


def make_env(suite: str, game: str, num_envs: int, seed: int, *, training: bool = True,
             max_episode_steps: int | None = None, num_threads: int = 0) -> VecEnv:
    """The vectorised env of ``game`` in ``suite``; ``training=False`` plays whole games
    on Atari (no life-loss cut)."""
    games = check_suite(suite)
    if game not in games:
        raise ValueError(f"game must be one of {games} for suite {suite!r}; got {game!r}")
    if not isinstance(num_envs, int) or num_envs < 1:
        raise ValueError(f"num_envs must be an int >= 1; got {num_envs!r}")
    cap = max_episode_steps or DEFAULT_MAX_EPISODE_STEPS[suite]
    if suite == "minatar5":
        return MinAtarVecEnv(game, num_envs, seed, max_episode_steps=cap)
    return AtariVecEnv(game, num_envs, seed, life_loss=training, num_threads=num_threads,
                       max_episode_steps=cap)


def available_cores() -> int:
    """CPU cores this process may run on (the affinity mask where there is one: a
    container or ``taskset`` often allows fewer than ``os.cpu_count()``)."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:  # pragma: no cover - macOS, Windows
        return max(os.cpu_count() or 1, 1)


def default_threads(suite: str, cores: int | None = None) -> int:
    """torch intra-op threads of a `blip rl` run when ``--threads`` is not given.

    MinAtar: 1. Its agent works on 10x10 inputs, little work per op, and OpenMP workers
    spin on cores that the envs and other processes need. On 2 cores (16 envs x 125 steps)
    2 threads ran 1.4x faster when the machine was idle (7660 against 5440 steps/s) but 16x
    slower when other jobs shared it (133 against 2170): 1 thread is never far from the best
    and never collapses.
    Atari: half the cores, at most 8 (the Nature CNN's 84x84 convolutions do scale, but
    ale-py's worker threads step the envs on the other half; past 8 the minibatch ops are
    too small to split further). On 2 cores that is 1: 260 steps/s against 69 with 2
    threads idle, 81 against 29 shared."""
    check_suite(suite)
    n = available_cores() if cores is None else cores
    if suite == "minatar5":
        return 1
    return max(1, min(8, n // 2))


def action_counts(suite: str, n_games: int | None = None) -> list[int]:
    """The action-set sizes of the suite's first ``n_games`` games (default all); builds
    one single env per game."""
    out = []
    for game in check_suite(suite)[:n_games]:
        env = make_env(suite, game, 1, 0)
        out.append(env.n_actions)
        env.close()
    return out


def obs_shape(suite: str) -> tuple[int, int, int]:
    check_suite(suite)
    return (MINATAR_CHANNELS, 10, 10) if suite == "minatar5" else (4, 84, 84)


__all__ = ["ALE_PY_MIN_VERSION", "SUITES", "AtariVecEnv", "MinAtarVecEnv",
           "MissingDependencyError", "Step", "VecEnv", "action_counts", "available_cores",
           "check_suite", "default_threads", "make_env", "obs_shape", "version_tuple"]
