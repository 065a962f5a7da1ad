"""Reading files a user points at without running code from them.

Two concerns live here, one place each:

* **Pickles of data sets** (CIFAR python batches, mini-ImageNet ``.pkl``): read with
  :class:`RestrictedUnpickler`, which builds only numpy arrays / dtypes / scalars and
  the plain containers and numbers pickle makes by itself (dict, list, tuple, str,
  bytes, int, float, bool, None). Any other global (``os.system``, ``builtins.eval``,
  a class) is refused before it is called. ``trust_pickles=True`` (or the
  :func:`trusted_pickles` context, or ``--trust-pickles`` on the CLI) opts out and uses
  :func:`pickle.load` for files the user vouches for.
* **Checkpoints**: a small header (magic, payload length, SHA-256) followed by a
  ``torch.save`` of *plain* data only (tensors, containers, numbers, strings, bytes),
  read back with ``torch.load(weights_only=True)``. numpy values are encoded as tagged
  plain data by :func:`to_plain` and decoded by :func:`from_plain`, so nothing in a
  checkpoint needs a pickle global. A flipped byte fails the checksum; a file of an
  older blip (a bare ``torch.save`` holding numpy RNG state) loads only when trusted.
"""

from __future__ import annotations

import codecs
import contextlib
import contextvars
import hashlib
import io
import json
import os
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

TRUST_HINT = ("pass --trust-pickles (API: trust_pickles=True) only if you trust where the "
              "file came from")

_trust: contextvars.ContextVar[bool] = contextvars.ContextVar("blip_trust_pickles",
                                                              default=False)


@contextlib.contextmanager
def trusted_pickles(trust: bool = True) -> Iterator[None]:
    """Within the block, readers called without ``trust_pickles`` use ``trust``
    (per thread / asyncio task: a contextvar)."""
    token = _trust.set(bool(trust))
    try:
        yield
    finally:
        _trust.reset(token)


def trusting(trust_pickles: bool | None = None) -> bool:
    """An explicit ``trust_pickles`` argument, else the :func:`trusted_pickles` setting."""
    return _trust.get() if trust_pickles is None else bool(trust_pickles)


class UnsafeFileError(ValueError):
    """A file holds something this package will not load without being told to trust it."""


# -- restricted unpickling of data-set pickles ---------------------------------------------


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    # Python 3 pickles of bytes at protocol <= 2 call _codecs.encode(text, "latin1").
    if codecs.lookup(encoding).name != "iso8859-1":
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r} is not allowed")
    return text.encode("latin1")


def _numpy_globals() -> dict[tuple[str, str], Any]:
    try:
        from numpy._core import multiarray, numeric  # numpy >= 2
    except ImportError:  # numpy 1
        from numpy.core import multiarray, numeric

    allowed = {"_reconstruct": multiarray._reconstruct, "scalar": multiarray.scalar}
    out: dict[tuple[str, str], Any] = {}
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        for name, fn in allowed.items():
            out[(mod, name)] = fn

    def frombuffer(buf: Any, dtype: Any, shape: Any, order: str) -> np.ndarray:
        # protocol 5 arrays: bytes into a new array (the dtype passed _plain_dtype)
        return numeric._frombuffer(buf, _plain_dtype(dtype), shape, order)

    for mod in ("numpy.core.numeric", "numpy._core.numeric"):
        out[(mod, "_frombuffer")] = frombuffer
    for mod in ("numpy", "numpy.core.multiarray", "numpy._core.multiarray"):
        out[(mod, "ndarray")] = np.ndarray
        out[(mod, "dtype")] = np.dtype
    return out


class RestrictedUnpickler(pickle.Unpickler):
    """Builds numpy arrays, dtypes and scalars and plain containers; nothing else.

    ``find_class`` is pickle's only door to callables: refusing every global except
    numpy's array reconstruction (which copies bytes into a new array) and a latin-1
    ``_codecs.encode`` means a ``__reduce__`` payload cannot name anything to call.
    Object arrays are refused too (their items would be unpickled objects).
    """

    _ALLOWED: dict[tuple[str, str], Any] | None = None

    def find_class(self, module: str, name: str) -> Any:
        if RestrictedUnpickler._ALLOWED is None:
            RestrictedUnpickler._ALLOWED = {**_numpy_globals(),
                                            ("_codecs", "encode"): _latin1_encode}
        fn = RestrictedUnpickler._ALLOWED.get((module, name))
        if fn is None:
            raise pickle.UnpicklingError(
                f"refusing to load global {module}.{name} (only numpy arrays and plain "
                f"containers are read from data pickles)")
        if fn is np.dtype:
            return _plain_dtype
        return fn


def _plain_dtype(spec: Any, *args: Any) -> np.dtype:
    dt = np.dtype(spec, *args)
    if dt.hasobject:
        raise pickle.UnpicklingError(f"refusing a numpy array of dtype {dt} (Python objects)")
    return dt


def load_pickle(f: IO[bytes], path: str | os.PathLike, *, encoding: str = "bytes",
                trust_pickles: bool | None = None) -> Any:
    """Unpickle a data file: restricted unless trusted. A refused global raises
    :class:`UnsafeFileError` naming ``path``; other failures propagate."""
    if trusting(trust_pickles):
        return pickle.load(f, encoding=encoding)  # noqa: S301 - the user trusts this file
    try:
        return RestrictedUnpickler(f, encoding=encoding).load()
    except pickle.UnpicklingError as e:
        if "refusing" in str(e):
            raise UnsafeFileError(f"{path}: {e}; {TRUST_HINT}") from None
        raise


# -- plain encoding of numpy values ----------------------------------------------------------

_ND, _NP = "__blip_ndarray__", "__blip_npscalar__"


def to_plain(obj: Any) -> Any:
    """``obj`` with numpy arrays and scalars replaced by tagged dicts of bytes; tensors,
    containers, numbers, strings and bytes unchanged. Anything else is a TypeError (a
    checkpoint must not need a pickle global to be read back)."""
    if isinstance(obj, torch.Tensor) or obj is None or isinstance(obj, (bool, int, float, str,
                                                                        bytes)):
        return obj
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind not in "biufc":
            raise TypeError(f"cannot store a numpy array of dtype {obj.dtype} as plain data")
        a = np.ascontiguousarray(obj)
        return {_ND: a.tobytes(), "dtype": a.dtype.str, "shape": list(a.shape)}
    if isinstance(obj, np.generic):
        return {_NP: obj.dtype.str, "value": obj.item()}
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_plain(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(to_plain(v) for v in obj)
    raise TypeError(f"cannot store a {type(obj).__module__}.{type(obj).__qualname__} as "
                    "plain checkpoint data")


def _numeric_dtype(spec: Any) -> np.dtype:
    dt = np.dtype(str(spec))
    if dt.kind not in "biufc":
        raise ValueError(f"numpy dtype {dt} is not numeric")
    return dt


def from_plain(obj: Any) -> Any:
    """Inverse of :func:`to_plain`."""
    if isinstance(obj, dict):
        if _ND in obj:
            dt = _numeric_dtype(obj["dtype"])
            return np.frombuffer(obj[_ND], dtype=dt).reshape(obj["shape"]).copy()
        if _NP in obj:
            return _numeric_dtype(obj[_NP]).type(obj["value"])
        return {k: from_plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [from_plain(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(from_plain(v) for v in obj)
    return obj


# -- checkpoint container ---------------------------------------------------------------------

MAGIC = b"BLIP-CHECKPOINT\n"
FORMAT = 2
_MAX_HEADER = 4096


def encode_checkpoint(obj: Any) -> tuple[bytes, bytes]:
    """(header, payload): a checkpoint file holding ``obj`` is the two written in turn
    (kept apart so the payload, the big part, is never copied to join them)."""
    buf = io.BytesIO()
    torch.save(to_plain(obj), buf)
    payload = buf.getvalue()
    header = {"format": FORMAT, "bytes": len(payload),
              "sha256": hashlib.sha256(payload).hexdigest()}
    return MAGIC + json.dumps(header).encode() + b"\n", payload


class CheckpointError(ValueError):
    """A checkpoint is corrupt, foreign, or needs trust to be read."""


def decode_checkpoint(data: bytes, path: str | os.PathLike, *,
                      map_location: str | torch.device = "cpu",
                      trust_pickles: bool | None = None) -> Any:
    """The object a checkpoint file's bytes hold; every failure a :class:`CheckpointError`
    naming ``path``."""
    if data.startswith(MAGIC):
        end = data.find(b"\n", len(MAGIC), len(MAGIC) + _MAX_HEADER)
        try:
            header = json.loads(data[len(MAGIC):end]) if end > 0 else None
            size, digest = int(header["bytes"]), str(header["sha256"])
            fmt = int(header["format"])
        except (ValueError, TypeError, KeyError):
            raise CheckpointError(f"checkpoint {path} has a corrupt header") from None
        if fmt > FORMAT:
            raise CheckpointError(f"checkpoint {path} has format {fmt}, newer than this blip's "
                                  f"{FORMAT}; upgrade blip to read it")
        payload = data[end + 1:]
        if len(payload) != size or hashlib.sha256(payload).hexdigest() != digest:
            raise CheckpointError(
                f"checkpoint {path} is corrupt: its payload does not match the checksum in its "
                f"header ({len(payload)} of {size} bytes); delete it, or run without --resume")
        try:
            obj = torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
            return from_plain(obj)
        except Exception as e:  # noqa: BLE001 - any failure of a checksummed file is a bug
            raise CheckpointError(f"checkpoint {path} passed its checksum but cannot be "
                                  f"read ({e})") from None
    if data.startswith(b"PK\x03\x04"):  # a bare torch.save: an older blip's checkpoint
        return _decode_legacy(data, path, map_location, trusting(trust_pickles))
    raise CheckpointError(f"checkpoint {path} is not a blip checkpoint (unknown header "
                          f"{data[:16]!r}); delete it, or run without --resume")


def _decode_legacy(data: bytes, path: str | os.PathLike, map_location: Any,
                   trust: bool) -> Any:
    try:
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=not trust)
    except pickle.UnpicklingError as e:
        if trust:
            raise CheckpointError(f"checkpoint {path} is unreadable ({e})") from None
        raise CheckpointError(
            f"checkpoint {path} was written by an older blip (no checksum) and holds pickled "
            f"Python objects, which are not loaded by default; {TRUST_HINT}, or start the run "
            f"again without --resume") from None
    except Exception as e:  # noqa: BLE001 - torch raises many types on a torn zip
        raise CheckpointError(f"checkpoint {path} is unreadable ({e}); delete it, or run "
                              "without --resume") from None


def read_checkpoint(path: str | os.PathLike, *, map_location: str | torch.device = "cpu",
                    trust_pickles: bool | None = None) -> Any:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e.strerror or e}") from None
    return decode_checkpoint(data, path, map_location=map_location, trust_pickles=trust_pickles)


__all__ = ["CheckpointError", "RestrictedUnpickler", "UnsafeFileError", "decode_checkpoint",
           "encode_checkpoint", "from_plain", "load_pickle", "read_checkpoint", "to_plain",
           "trusted_pickles", "trusting"]
