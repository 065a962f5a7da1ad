"""Argument checks shared by the API and the CLI: one place, one wording.

Numbers are checked as the kernels will see them, in float32: ``1e39`` is finite in
Python but ``inf`` in fp32 (a learning rate of 1e39 would turn every step into NaN and
reset each weight to ``prev``), so "finite" here means finite after the cast. Bools
are refused where a number is expected (``True`` is an ``int`` to Python).
"""

from __future__ import annotations

import math
import numbers
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

FP32_MAX = float(np.finfo(np.float32).max)
#: smallest positive normal float32: a positive value below it is 0 or denormal in fp32
FP32_TINY = float(np.finfo(np.float32).tiny)


# Upper bounds of run settings: past them a run cannot work, and the failure would
# otherwise be an allocation traceback or a foreign library's message naming no option.
#: seeds go to numpy's RandomState, which takes 0..2**32-1
MAX_SEED = 2**32 - 1
#: torch/ALE threads: far above any one machine's cores (torch rejects values past a C int)
MAX_THREADS = 1024
#: MLP hidden units: a 65536-wide hidden-to-hidden layer is already 4.3e9 weights (17 GB
#: fp32, 39 GB with BLIP's 9 bytes of state per weight), past any one device's memory
MAX_HIDDEN = 2**16
#: hidden layers of the MLP: the published ones use 1-2; 1024 is already a long build
MAX_LAYERS = 1024
#: channel multiplier of AlexNet / ResNet-18: at 16 ResNet-18 holds ~2.9e9 weights (12 GB
#: fp32), which is as far as one device's memory goes (weights grow as width**2)
MAX_WIDTH = 16.0


def is_number(v: Any) -> bool:
    """A real number that is not a bool (numpy scalars included)."""
    return isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_))


def is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_))


def finite32(v: float) -> bool:
    return math.isfinite(v) and abs(v) <= FP32_MAX


def _range_text(lo: float | None, hi: float | None, lo_open: bool, hi_open: bool) -> str:
    parts = []
    if lo is not None:
        parts.append(f"{'>' if lo_open else '>='} {lo:g}")
    if hi is not None:
        parts.append(f"{'<' if hi_open else '<='} {hi:g}")
    return " and ".join(parts)


def number(name: str, v: Any, *, lo: float | None = None, hi: float | None = None,
           lo_open: bool = False, hi_open: bool = False, integer: bool = False,
           where: str = "") -> Any:
    """``v`` if it is a number (an int when ``integer``), finite in float32 and in the
    range; else a ValueError naming ``name`` (prefixed by ``where``, e.g. "method 'ewc': ")."""
    kind = "an int" if integer else "a finite number"
    rng = _range_text(lo, hi, lo_open, hi_open)
    want = f"{kind}{' ' + rng if rng else ''}"
    ok = is_int(v) if integer else is_number(v)
    if ok:
        f = float(v)
        ok = (integer or finite32(f)) and not (
            (lo is not None and (f <= lo if lo_open else f < lo))
            or (hi is not None and (f >= hi if hi_open else f > hi)))
    if not ok:
        extra = ("" if integer or not is_number(v) or finite32(float(v))
                 else " (not finite in float32, the precision the kernels use)")
        raise ValueError(f"{where}{name} must be {want}; got {v!r}{extra}")
    return v


def positive32(name: str, v: Any, where: str = "") -> Any:
    """A number > 0 that stays positive (normal) in float32, e.g. a Fisher prior."""
    number(name, v, lo=0.0, lo_open=True, where=where)
    if float(v) < FP32_TINY:
        raise ValueError(f"{where}{name} must be at least {FP32_TINY:g} (it is 0 or denormal "
                         f"in float32); got {v!r}")
    return v


def optional_int(name: str, v: Any, lo: int, where: str = "", hi: int | None = None) -> Any:
    return v if v is None else number(name, v, lo=lo, hi=hi, integer=True, where=where)


def check_hparams(method: str, defaults: Mapping[str, Any], values: Mapping[str, Any]) -> None:
    """Type and range checks every method gets, from its HPARAMS defaults: a number
    default takes a finite float32 number (not a bool); a None default takes None or a
    non-bool; a bool default takes a bool. ``momentum`` is in [0, 1), ``weight_decay``
    >= 0. Methods add their own range checks on top."""
    where = f"method {method!r}: "
    for k, default in defaults.items():
        v = values[k]
        if is_number(default):
            number(k, v, where=where)
        elif default is None and isinstance(v, (bool, np.bool_)):
            raise ValueError(f"{where}{k} must be a number or None; got {v!r}")
        elif isinstance(default, bool) and not isinstance(v, bool):
            raise ValueError(f"{where}{k} must be True or False; got {v!r}")
    if "momentum" in values:
        number("momentum", values["momentum"], lo=0.0, hi=1.0, hi_open=True, where=where)
    if "weight_decay" in values:
        number("weight_decay", values["weight_decay"], lo=0.0, where=where)


def writable_dir(path: str | os.PathLike, what: str = "out") -> Path:
    """Create ``path`` if needed and prove a file can be written there, before any work
    whose results would go there; a ValueError naming ``what`` otherwise."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ValueError(f"{what} {p} exists and is not a directory")
    try:
        p.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".blip-write-test.", dir=p)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ValueError(f"{what} {p} is not a writable directory: {e.strerror or e}") from None
    return p


def require_keys(d: Any, keys: tuple[str, ...], path: str | os.PathLike, what: str) -> dict:
    """``d`` if it is a dict holding ``keys``; else a ValueError naming ``path``."""
    if not isinstance(d, dict):
        raise ValueError(f"{path} is not {what} (it holds a {type(d).__name__}, not an object)")
    missing = [k for k in keys if k not in d]
    if missing:
        raise ValueError(f"{path} is not {what} (it lacks {', '.join(map(repr, missing))})")
    return d


__all__ = ["FP32_MAX", "MAX_HIDDEN", "MAX_LAYERS", "MAX_SEED", "MAX_THREADS", "MAX_WIDTH",
           "check_hparams", "finite32", "is_int", "is_number", "number",
           "optional_int", "positive32", "require_keys", "writable_dir"]
