"""A MinAtar vector env's mid-game state as plain data (no pickle), and back.

The state is every attribute of the vector env, of each game wrapper and of each game
(ints, floats, bools, strings, numpy arrays, lists / tuples / dicts of those) plus the
state of each game's ``RandomState``. Restoring builds fresh envs and sets only the
attributes a fresh env has, with plain values: a crafted checkpoint can at worst
give a strange game, never run code.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .envs import MinAtarVecEnv

_VERSION = 1
_PLAIN = (bool, int, float, str, type(None), np.ndarray, np.generic)


def _plain(v: Any, where: str) -> Any:
    """``v`` if it is plain data all the way down; a TypeError naming ``where`` if not."""
    if isinstance(v, _PLAIN):
        if isinstance(v, np.ndarray | np.generic) and v.dtype.kind not in "biufc":
            raise TypeError(f"{where}: numpy dtype {v.dtype} is not plain data")
        return v
    if isinstance(v, list | tuple):
        return type(v)(_plain(x, f"{where}[{i}]") for i, x in enumerate(v))
    if isinstance(v, dict):
        return {k: _plain(x, f"{where}[{k!r}]") for k, x in v.items()}
    raise TypeError(f"{where}: a {type(v).__name__} is not plain env state")


def _attrs(obj: Any, skip: tuple[str, ...], where: str) -> dict[str, Any]:
    return {k: _plain(v, f"{where}.{k}") for k, v in vars(obj).items() if k not in skip}


def dump_minatar(env: MinAtarVecEnv) -> dict[str, Any]:
    """Plain data from which :func:`load_minatar` rebuilds ``env`` exactly."""
    return {
        "version": _VERSION, "game": env.game, "num_envs": env.num_envs,
        "max_episode_steps": env.max_episode_steps,
        "vec": _attrs(env, ("envs",), "env"),
        # each wrapper and its game share one RandomState (MinAtar's seed()): stored once
        "envs": [{"wrapper": _attrs(e, ("env", "random"), f"env.envs[{i}]"),
                  "game": _attrs(e.env, ("random",), f"env.envs[{i}].env"),
                  "random": _plain(e.random.get_state(), f"env.envs[{i}].random")}
                 for i, e in enumerate(env.envs)],
    }


def _assign(obj: Any, attrs: Any, where: str) -> None:
    if not isinstance(attrs, dict):
        raise ValueError(f"{where}: expected a dict of attributes; got {type(attrs).__name__}")
    for k, v in attrs.items():
        # only what a fresh env has (no new attributes from data), never its sub-objects
        if not hasattr(obj, k) or k in ("envs", "env", "random"):
            raise ValueError(f"{where}: attribute {k!r} cannot be restored")
        setattr(obj, k, _plain(v, f"{where}.{k}"))


def load_minatar(state: Any) -> MinAtarVecEnv:
    """The env :func:`dump_minatar` saved; a ValueError if ``state`` is not one."""
    if not (isinstance(state, dict) and state.get("version") == _VERSION):
        raise ValueError("mid-game env state is not a MinAtar state of this blip version")
    try:
        env = MinAtarVecEnv(state["game"], state["num_envs"], seed=0,
                            max_episode_steps=state["max_episode_steps"])
        if len(state["envs"]) != env.num_envs:
            raise ValueError(f"{len(state['envs'])} sub-env states for {env.num_envs} envs")
        _assign(env, state["vec"], "env")
        for i, (e, s) in enumerate(zip(env.envs, state["envs"], strict=True)):
            _assign(e, s["wrapper"], f"env.envs[{i}]")
            _assign(e.env, s["game"], f"env.envs[{i}].env")
            e.random.set_state(tuple(s["random"]))
            e.env.random = e.random
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise ValueError(f"mid-game env state is malformed ({e})") from None
    return env


__all__ = ["dump_minatar", "load_minatar"]
