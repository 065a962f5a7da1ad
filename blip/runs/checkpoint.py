"""Atomic checkpoints: a killed run never leaves a half-written file behind."""

from __future__ import annotations

import glob
import os
import random
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from . import safeload


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    try:
        torch.set_rng_state(state["torch"])
        np.random.set_state(state["numpy"])
        random.setstate(tuple(state["python"]))
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"the checkpoint's RNG state is malformed ({e})") from None


_TEMP_PID = re.compile(r"p(\d+)\.[^.]+")  # between ".NAME." and ".tmp"


def _writer_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True  # another thread of this process writing the same file
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return pid > 0  # PermissionError: alive, another user's
    return True


def _remove_stale_temps(path: Path) -> None:
    """Temp files of earlier writes of ``path`` that a kill left behind (each as big as
    the file): the next write of the same file removes them, but only those whose writer
    is gone. The writer's pid is in the temp's name (``.NAME.pPID.RANDOM.tmp``) and is
    asked with ``os.kill(pid, 0)``: exact on one machine, where an age threshold would
    either delete a slow live writer's file or keep dead ones for its whole length. (A
    reused pid keeps a stale temp until that process ends; temps without a pid are an
    older blip's and are removed as before.)"""
    prefix = len(path.name) + 2
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        rest = stale.name[prefix:-4]
        m = _TEMP_PID.fullmatch(rest)
        if m is not None:
            if not _writer_alive(int(m.group(1))):
                stale.unlink(missing_ok=True)
        elif "." not in rest:  # an older blip's temp (no pid)
            stale.unlink(missing_ok=True)
        # else the temp of another file whose name starts with ours (NAME.bak): not ours


def _umask() -> int:
    """The process umask, read without changing it (os.umask sets it, racing other
    threads' file creation) where /proc says it, else the one seen at import."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return _IMPORT_UMASK


_IMPORT_UMASK = os.umask(0o022)
os.umask(_IMPORT_UMASK)


def _write_atomic(path: str | os.PathLike, mode: str, write: Callable[[IO], None]) -> None:
    """Write to a temp file in the same directory, fsync, then os.replace: readers
    see the old file or the new one, never a torn write. The file gets the usual mode
    (0666 less the umask, as open() would give; mkstemp makes 0600). Any OSError (disk
    full, read-only, a file in the way) is re-raised naming ``path``."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.p{os.getpid()}.", suffix=".tmp",
                                   dir=path.parent)
        try:
            os.fchmod(fd, 0o666 & ~_umask())
            with os.fdopen(fd, mode) as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        # fsync the directory so the rename itself survives a crash (POSIX only)
        if hasattr(os, "O_DIRECTORY"):
            dfd = os.open(path.parent, os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
    except OSError as e:
        raise OSError(e.errno, f"cannot write {path}: {e.strerror or e}") from e


def _write_bytes(f: IO, data: bytes) -> None:
    f.write(data)  # every atomic write goes through here, so a test can make the disk "full"


def save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """A checksummed checkpoint of plain data (:mod:`blip.runs.safeload`), atomically."""
    header, payload = safeload.encode_checkpoint(obj)
    _write_atomic(path, "wb", lambda f: (_write_bytes(f, header), _write_bytes(f, payload)))


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    data = text.encode()  # UTF-8 whatever the locale (JSON, CSV, Markdown)
    _write_atomic(path, "wb", lambda f: _write_bytes(f, data))


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu", *,
         required: tuple[str, ...] = (), trust_pickles: bool | None = None) -> dict[str, Any]:
    """A checkpoint written by :func:`save_atomic`, verified (checksum, no pickle globals)
    and holding a dict with the ``required`` keys; else a ValueError naming the file.
    Checkpoints of older blip versions need ``trust_pickles`` (they hold numpy pickles)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    c = safeload.read_checkpoint(path, map_location=map_location, trust_pickles=trust_pickles)
    missing = [k for k in required if k not in c] if isinstance(c, dict) else list(required)
    if not isinstance(c, dict) or missing:
        what = f"lacks {missing}" if isinstance(c, dict) else f"holds a {type(c).__name__}"
        raise ValueError(f"checkpoint {path} is not a checkpoint of this kind of run ({what}); "
                         "delete it, or run without --resume to start over")
    return c


def check_resumable(saved: dict[str, Any], now: dict[str, Any], keys: Any, path: Path) -> None:
    """Refuse to resume ``path`` when a setting in ``keys`` differs from the checkpoint's."""
    diff = [k for k in keys if saved.get(k) != now.get(k)]
    if diff:
        detail = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs now {now.get(k)!r}"
                           for k in diff)
        raise ValueError(f"cannot resume {path}: settings differ ({detail})")


def jsonable(obj: Any) -> Any:
    """``obj`` with tensors, numpy scalars and tuples turned into JSON types (others: repr)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.item() if obj.numel() == 1 else obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, (int, float, str, bool)) or obj is None:
        return obj
    return repr(obj)
