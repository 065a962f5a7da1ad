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
import math
import os
import pickle
import re
import struct
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
#
# numpy's own unpickling (``_reconstruct`` then ``ndarray.__setstate__``, ``dtype.
# __setstate__``) trusts its input: a BUILD on a dtype an array already uses changes the
# array's item size under it (an out-of-bounds read), dtype flags can claim Python objects,
# and a shape allocates before any data is seen. So nothing of numpy runs while a data
# pickle is read: its globals resolve to inert stubs that record their arguments, and
# only after the whole stream is read is each array rebuilt from its raw bytes by
# ``np.frombuffer`` with a plain numeric dtype whose size must match the bytes exactly.


def _refuse(what: str) -> pickle.UnpicklingError:
    # every message says "refusing": load_pickle turns those into UnsafeFileError
    return pickle.UnpicklingError(f"refusing {what} (only numpy arrays of numbers and plain "
                                  "containers are read from data pickles)")


class _NdarrayClass:
    """Stands for ``numpy.ndarray`` as ``_reconstruct``'s first argument."""

    def __call__(self, *args: Any) -> None:
        raise _refuse(f"numpy.ndarray{args!r:.80} (an array allocated from a shape)")

    def __repr__(self) -> str:
        return "numpy.ndarray"


_NDARRAY = _NdarrayClass()
_BYTE_ORDERS = {"<": "<", ">": ">", "|": "|", "=": "="}
_NUMERIC_TYPESTR = re.compile(r"[biufc]\d{1,2}")


def _text(v: Any) -> str | None:
    """A short str from a str or bytes field (py2 pickles read with encoding="bytes")."""
    if isinstance(v, bytes) and len(v) <= 8:
        return v.decode("ascii", "replace")
    return v if isinstance(v, str) and len(v) <= 8 else None


def _raw(v: Any, what: str) -> bytes | bytearray:
    if isinstance(v, (bytes, bytearray)):
        return v
    if isinstance(v, str):  # py2 str data read with encoding="latin1"
        try:
            return v.encode("latin1")
        except UnicodeEncodeError:
            pass
    raise _refuse(f"{what} whose data is a {type(v).__name__}, not bytes (an object array?)")


class _DtypeStub:
    __slots__ = ("state", "typestr")

    def __init__(self, typestr: str) -> None:
        self.typestr, self.state = typestr, None

    def build(self, state: Any) -> None:
        # numpy writes (3, byteorder, None, None, None, -1, -1, 0) for a numeric dtype
        # (version 4 appends metadata, None here): nothing else is accepted.
        ok = (isinstance(state, tuple) and len(state) in (8, 9)
              and state[0] == (3 if len(state) == 8 else 4) and _text(state[1]) in _BYTE_ORDERS
              and state[2:5] == (None, None, None) and state[5:8] == (-1, -1, 0)
              and (len(state) == 8 or state[8] is None))
        if not ok:
            raise _refuse(f"a numpy dtype {self.typestr!r} with state {state!r:.120}")
        self.state = state

    def canonical(self) -> np.dtype:
        order = _BYTE_ORDERS[_text(self.state[1])] if self.state is not None else "="
        dt = np.dtype(self.typestr if order == "|" else order + self.typestr)
        if dt.kind not in "biufc" or (order == "|" and dt.itemsize != 1):
            raise _refuse(f"a numpy dtype {self.typestr!r} with byte order {order!r}")
        return dt


def _dtype(typestr: Any, align: Any = None, copy: Any = None) -> _DtypeStub:
    # numpy writes dtype(typestr, False, True) (py2 numpy: 0, 1)
    t = _text(typestr)
    if t is not None and t[:1] == "O":
        raise _refuse(f"a numpy array of Python objects (dtype {t!r})")
    if t is None or not _NUMERIC_TYPESTR.fullmatch(t) or align not in (False, 0) \
            or copy not in (True, 1) or isinstance(align, float) or isinstance(copy, float):
        raise _refuse(f"a numpy dtype {typestr!r:.40} (only numbers: bool, int, uint, float, "
                      "complex)")
    try:
        np.dtype(t)
    except TypeError:
        raise _refuse(f"a numpy dtype {t!r}") from None
    return _DtypeStub(t)


class _ArrayStub:
    __slots__ = ("built", "dtype", "order", "raw", "shape")

    def __init__(self, shape: Any = None, dtype: Any = None, order: str = "C", raw: Any = None,
                 built: bool = False) -> None:
        self.shape, self.dtype, self.order, self.raw, self.built = shape, dtype, order, raw, built

    def build(self, state: Any) -> None:
        # ndarray.__reduce__'s state: (1, shape, dtype, is_fortran, raw bytes)
        if not (isinstance(state, tuple) and len(state) == 5 and state[0] == 1
                and isinstance(state[2], _DtypeStub) and state[3] in (False, True, 0, 1)):
            raise _refuse(f"a numpy array state {state!r:.120}")
        self.shape, self.dtype = state[1], state[2]
        self.order = "F" if state[3] else "C"
        self.raw = _raw(state[4], "a numpy array")
        self.built = True


def _reconstruct(cls: Any, shape: Any, typecode: Any) -> _ArrayStub:
    # numpy writes exactly _reconstruct(ndarray, (0,), b'b') and puts everything in BUILD
    if cls is not _NDARRAY or shape != (0,) or not isinstance(shape, tuple) \
            or typecode not in (b"b", "b"):
        raise _refuse(f"numpy _reconstruct{(cls, shape, typecode)!r:.120}")
    return _ArrayStub()


def _frombuffer(buf: Any, dtype: Any, shape: Any, order: Any) -> _ArrayStub:
    # protocol 5: _frombuffer(bytes, dtype, shape, 'C' or 'F'); no BUILD follows
    if not isinstance(dtype, _DtypeStub) or order not in ("C", "F"):
        raise _refuse(f"numpy _frombuffer with dtype/order {(dtype, order)!r:.120}")
    return _ArrayStub(shape, dtype, order, _raw(buf, "a numpy array"), built=True)


class _ScalarStub:
    __slots__ = ("dtype", "raw")

    def __init__(self, dtype: Any, raw: Any) -> None:
        self.dtype, self.raw = dtype, raw


def _scalar(dtype: Any, raw: Any = None) -> _ScalarStub:
    if not isinstance(dtype, _DtypeStub):
        raise _refuse(f"a numpy scalar of {dtype!r:.60}")
    return _ScalarStub(dtype, _raw(raw, "a numpy scalar"))


def _latin1_encode(text: Any, encoding: Any = "latin1") -> bytes:
    # Python 3 pickles of bytes at protocol <= 2 call _codecs.encode(text, "latin1").
    if not isinstance(text, str) or not isinstance(encoding, str) \
            or codecs.lookup(encoding).name != "iso8859-1":
        raise _refuse(f"_codecs.encode with encoding {encoding!r:.40}")
    return text.encode("latin1")


def _empty_bytes(*args: Any) -> bytes:
    # protocols 0-2 write b"" as a call of bytes() with no argument
    if args:
        raise _refuse(f"bytes{args!r:.60}")
    return b""


def _allowed_globals() -> dict[tuple[str, str], Any]:
    out: dict[tuple[str, str], Any] = {("_codecs", "encode"): _latin1_encode,
                                       ("builtins", "bytes"): _empty_bytes,
                                       ("__builtin__", "bytes"): _empty_bytes}
    for core in ("numpy.core", "numpy._core"):  # numpy 1 / numpy 2 module names
        out[(f"{core}.multiarray", "_reconstruct")] = _reconstruct
        out[(f"{core}.multiarray", "scalar")] = _scalar
        out[(f"{core}.numeric", "_frombuffer")] = _frombuffer
    for mod in ("numpy", "numpy.core.multiarray", "numpy._core.multiarray"):
        out[(mod, "ndarray")] = _NDARRAY
        out[(mod, "dtype")] = _dtype
    return out


_ALLOWED = _allowed_globals()
#: arrays rebuilt from one pickle may total at most this many times the file's size (the
#: pickle memo lets one bytes object back many arrays)
MAX_EXPANSION = 2


class _BoundedReader:
    """A file whose reads never ask for more than what is left of it, so a length field
    in a crafted pickle cannot make the reader allocate more than the file holds."""

    def __init__(self, f: IO[bytes]) -> None:
        try:
            pos = f.tell()
            self.left = f.seek(0, io.SEEK_END) - pos
            f.seek(pos)
            self.f = f
        except (AttributeError, OSError, ValueError):  # not seekable: read it all
            data = f.read()
            self.f, self.left = io.BytesIO(data), len(data)
        self.size = self.left

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = self.left
        if n > self.left:
            raise pickle.UnpicklingError(f"pickle data was truncated (a field of {n} bytes "
                                         f"with {self.left} left in the file)")
        data = self.f.read(n)
        self.left -= len(data)
        return data

    def readline(self) -> bytes:
        line = self.f.readline()
        self.left -= len(line)
        return line


class RestrictedUnpickler(pickle._Unpickler):  # the Python one: its opcodes can be replaced
    """Reads numpy arrays and scalars of numbers and plain containers (dict, list, tuple,
    set, str, bytes, int, float, bool, None); nothing else.

    ``find_class`` is pickle's only door to callables, and here it opens only onto the
    inert stubs above (and a latin-1 ``_codecs.encode``): a ``__reduce__`` payload
    cannot name anything to call, and numpy itself runs only after the stream is read,
    on bytes checked against a plain numeric dtype and shape (:meth:`load`). BUILD is
    accepted once, on a fresh stub; the opcodes that instantiate classes are refused.
    """

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file: IO[bytes], *, encoding: str = "ASCII", errors: str = "strict"
                 ) -> None:
        self._reader = _BoundedReader(file)
        super().__init__(self._reader, encoding=encoding, errors=errors)

    def find_class(self, module: str, name: str) -> Any:
        fn = _ALLOWED.get((module, name))
        if fn is None:
            raise _refuse(f"to load global {module}.{name}")
        return fn

    def persistent_load(self, pid: Any) -> Any:
        raise _refuse("a persistent id")

    def _load_build(self) -> None:
        state = self.stack.pop()
        inst = self.stack[-1]
        if type(inst) not in (_ArrayStub, _DtypeStub) or \
                (inst.built if type(inst) is _ArrayStub else inst.state is not None):
            raise _refuse(f"a BUILD on {type(inst).__name__} (only once, on a fresh numpy "
                          "array or dtype)")
        inst.build(state)

    def _load_bytearray8(self) -> None:
        (n,) = struct.unpack("<Q", self.read(8))
        if n > self._reader.size:  # checked before bytearray(n) allocates it
            raise pickle.UnpicklingError(f"pickle data was truncated (a bytearray of {n} "
                                         "bytes)")
        self.append(bytearray(self.read(n)))

    def _load_instantiating(self) -> None:
        raise _refuse("an opcode that instantiates a class (INST/OBJ/NEWOBJ/EXT)")

    dispatch[pickle.BUILD[0]] = _load_build
    dispatch[pickle.BYTEARRAY8[0]] = _load_bytearray8
    for _op in (pickle.INST, pickle.OBJ, pickle.NEWOBJ, pickle.NEWOBJ_EX, pickle.EXT1,
                pickle.EXT2, pickle.EXT4):
        dispatch[_op[0]] = _load_instantiating
    del _op

    def load(self) -> Any:
        obj = super().load()
        budget = [MAX_EXPANSION * self._reader.size]
        try:
            out = _Rebuilder(budget).walk(obj)
        except RecursionError:
            raise _refuse("a pickle nested too deeply") from None
        return out


class _Rebuilder:
    """Turns the stubs of a loaded pickle into numpy values; containers are rebuilt as they
    are met (cycles and shared objects kept, each array made once)."""

    def __init__(self, budget: list[int]) -> None:
        self.budget = budget
        self.done: dict[int, Any] = {}

    def walk(self, obj: Any) -> Any:
        key = id(obj)
        if key in self.done:
            return self.done[key]
        t = type(obj)
        if t is _ArrayStub:
            out = self.done[key] = self._array(obj)
        elif t is _ScalarStub:
            dt = obj.dtype.canonical()
            if len(obj.raw) != dt.itemsize:
                raise _refuse(f"a numpy scalar of {dt} from {len(obj.raw)} bytes")
            value = np.frombuffer(bytes(obj.raw), dt)
            out = self.done[key] = (value.view(np.uint8) != 0 if dt.kind == "b" else value)[0]
        elif t is _DtypeStub:
            out = self.done[key] = obj.canonical()
        elif t is _NdarrayClass:
            raise _refuse("numpy.ndarray itself as a value")
        elif t is list:
            self.done[key] = obj  # in place, so a list holding itself stays one list
            obj[:] = [self.walk(v) for v in obj]
            out = obj
        elif t is dict:
            self.done[key] = obj
            items = [(self._key(k), self.walk(v)) for k, v in obj.items()]
            obj.clear()
            obj.update(items)
            out = obj
        elif t is tuple:
            out = tuple(self.walk(v) for v in obj)
            self.done[key] = out
        elif t in (set, frozenset):
            out = t(self._key(v) for v in obj)
            self.done[key] = out
        elif t in (str, bytes, bytearray, int, float, complex, bool, type(None)):
            out = obj
        else:
            raise _refuse(f"a {t.__qualname__}")
        return out

    def _key(self, k: Any) -> Any:
        if type(k) in (_ArrayStub, _ScalarStub, _DtypeStub, _NdarrayClass, tuple):
            out = self.walk(k)
            hash(out)  # an array as a dict key or set item: TypeError, as numpy would give
            return out
        return k

    def _array(self, a: _ArrayStub) -> np.ndarray:
        if not a.built:
            raise _refuse("a numpy array without its state (no BUILD)")
        shape = a.shape
        if not (isinstance(shape, tuple) and len(shape) <= 32
                and all(type(n) is int and 0 <= n < 2**62 for n in shape)):
            raise _refuse(f"a numpy array of shape {shape!r:.80}")
        dt = a.dtype.canonical()
        count = math.prod(shape)
        if count * dt.itemsize != len(a.raw):
            raise _refuse(f"a numpy array of shape {shape} and dtype {dt} from {len(a.raw)} "
                          f"bytes of data (it needs {count * dt.itemsize})")
        self.budget[0] -= len(a.raw)
        if self.budget[0] < 0:
            raise _refuse(f"numpy arrays totalling more than {MAX_EXPANSION}x the file's size")
        out = np.frombuffer(a.raw, dt, count).reshape(shape, order=a.order)
        # numpy bools are bytes that must hold 0 or 1: any other byte becomes True
        return out.view(np.uint8) != 0 if dt.kind == "b" else out.copy(order="K")


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
        except (ValueError, TypeError, KeyError, ArithmeticError):  # "bytes": 1e999 -> inf
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
