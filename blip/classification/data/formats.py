"""Readers for the standard on-disk formats of the full benchmarks.

Every reader raises `DataFormatError` naming the file and the format it expected,
so a half-downloaded or misplaced file is diagnosed at once instead of deep inside
training.
"""

from __future__ import annotations

import gzip
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ...runs.safeload import UnsafeFileError, load_pickle
from .base import DataFormatError

IDX_FORMAT = (
    "IDX (MNIST format: 2 zero bytes, dtype code 0x08, number of dims, big-endian int32 "
    "sizes, then uint8 data; optionally .gz-compressed)"
)
CIFAR_FORMAT = (
    "CIFAR python pickle batch (a dict with b'data': N x 3072 uint8 and b'labels' or "
    "b'fine_labels')"
)
SVHN_FORMAT = "SVHN cropped-digits .mat (X: 32x32x3xN uint8, y: Nx1 with 10 meaning digit 0)"


def find_file(dirs: Sequence[Path], names: Sequence[str], fmt: str) -> Path:
    """The first existing `dir/name`; the error lists every place looked at."""
    tried = []
    for d in dirs:
        for n in names:
            p = Path(d) / n
            if p.is_file():
                return p
            tried.append(str(p))
    raise DataFormatError(
        f"missing data file {names[0]!r} (expected format: {fmt}); looked for: "
        + ", ".join(tried)
    )


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (MNIST, FashionMNIST), gzip-compressed or not."""
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"missing data file {path} (expected {IDX_FORMAT})")
    try:
        with path.open("rb") as f:
            head = f.read(2)
        opener = gzip.open if head == b"\x1f\x8b" else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DataFormatError(f"cannot read {path}: {e} (expected {IDX_FORMAT})") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or not 1 <= raw[3] <= 4:
        raise DataFormatError(f"{path} is not an IDX uint8 file: bad magic {raw[:4]!r} "
                              f"(expected {IDX_FORMAT})")
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise DataFormatError(f"{path}: truncated IDX header (expected {IDX_FORMAT})")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    n = math.prod(shape)  # Python ints: a forged header cannot overflow the size check
    body = raw[4 + 4 * ndim:]
    if len(body) != n:
        raise DataFormatError(
            f"{path}: IDX header says shape {shape} ({n} bytes) but the file holds "
            f"{len(body)} data bytes (truncated or corrupt download?)")
    return np.frombuffer(body, dtype=np.uint8).reshape(shape).copy()


def read_idx_pair(images: Path, labels: Path,
                  image_shape: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels of one split; ``image_shape`` (H, W) when the format fixes it."""
    x, y = read_idx(images), read_idx(labels)
    if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
        raise DataFormatError(
            f"{images} / {labels}: expected N x H x W images and N labels, got shapes "
            f"{x.shape} and {y.shape} ({IDX_FORMAT})")
    if image_shape is not None and x.shape[1:] != tuple(image_shape):
        raise DataFormatError(f"{images}: images of {x.shape[1]} x {x.shape[2]} pixels, "
                              f"expected {image_shape[0]} x {image_shape[1]} ({IDX_FORMAT})")
    if len(y) == 0:
        raise DataFormatError(f"{images}: holds no images ({IDX_FORMAT})")
    return x, y


def _integers(a: np.ndarray, path: Path, what: str, lo: int, hi: int, fmt: str) -> np.ndarray:
    """``a`` (unchanged) if it holds integers in lo..hi: checked before any cast, as
    int64 300 would wrap to 44 as uint8 and a label 1.7 truncate to 1."""
    if a.dtype == np.uint8 and lo <= 0 and hi >= 255:
        return a  # in range by its type: no pass over the data
    integral = a.dtype.kind in "iu" or (
        a.dtype.kind == "f" and bool(np.all(np.isfinite(a))) and np.array_equal(a, np.round(a)))
    if not integral:
        raise DataFormatError(f"{path}: {what} of dtype {a.dtype} are not integers "
                              f"(expected {fmt})")
    if a.size and (a.min() < lo or a.max() > hi):
        raise DataFormatError(f"{path}: {what} range {a.min()}..{a.max()}, outside {lo}..{hi} "
                              f"(expected {fmt})")
    return a


def _unpickle(path: Path, fmt: str, encoding: str, trust_pickles: bool | None) -> object:
    if not path.is_file():
        raise DataFormatError(f"missing data file {path} (expected {fmt})")
    try:
        with path.open("rb") as f:
            return load_pickle(f, path, encoding=encoding, trust_pickles=trust_pickles)
    except UnsafeFileError as e:
        raise DataFormatError(str(e)) from None
    except Exception as e:  # pickle raises many unrelated types on garbage input
        raise DataFormatError(f"cannot unpickle {path}: {e!r} (expected {fmt})") from e


def read_cifar_batch(path: str | os.PathLike,
                     trust_pickles: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10/100 python batch -> (N x 3 x 32 x 32 uint8, N labels).

    Unpickled with :class:`blip.runs.safeload.RestrictedUnpickler` unless ``trust_pickles``
    (None: the :func:`blip.runs.safeload.trusted_pickles` setting)."""
    path = Path(path)
    d = _unpickle(path, CIFAR_FORMAT, "bytes", trust_pickles)
    if not isinstance(d, dict):
        raise DataFormatError(f"{path}: unpickled a {type(d).__name__}, not a dict "
                              f"(expected {CIFAR_FORMAT})")
    d = {(k.decode() if isinstance(k, bytes) else k): v for k, v in d.items()}
    key = "fine_labels" if "fine_labels" in d else "labels"
    if "data" not in d or key not in d:
        raise DataFormatError(f"{path}: keys {sorted(d)} lack 'data'/'labels' "
                              f"(expected {CIFAR_FORMAT})")
    try:
        x, y = np.asarray(d["data"]), np.asarray(d[key])
    except (ValueError, TypeError) as e:  # ragged lists and the like
        raise DataFormatError(f"{path}: unreadable data/labels: {e} (expected {CIFAR_FORMAT})") \
            from None
    if x.ndim != 2 or x.shape[1] != 3072 or y.ndim != 1 or len(x) != len(y) or not len(y):
        raise DataFormatError(f"{path}: data shape {x.shape} with labels {y.shape} "
                              f"(expected {CIFAR_FORMAT})")
    x = _integers(x, path, "pixels", 0, 255, CIFAR_FORMAT).astype(np.uint8, copy=False)
    y = _integers(y, path, "labels", 0, 99, CIFAR_FORMAT).astype(np.int64)
    return x.reshape(-1, 3, 32, 32), y


def read_svhn_mat(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """SVHN .mat -> (N x 3 x 32 x 32 uint8, labels 0..9)."""
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"missing data file {path} (expected {SVHN_FORMAT})")
    try:
        from scipy.io import loadmat
    except ImportError as e:
        raise DataFormatError(f"reading {path} ({SVHN_FORMAT}) needs scipy "
                              "(pip install scipy)") from e
    try:
        m = loadmat(str(path))
    except Exception as e:  # scipy raises ValueError/TypeError/NotImplementedError (v7.3)...
        raise DataFormatError(f"cannot read {path}: {e!r} (expected {SVHN_FORMAT})") from e
    if "X" not in m or "y" not in m:
        keys = sorted(k for k in m if not k.startswith("__"))
        raise DataFormatError(f"{path}: variables {keys} lack 'X'/'y' (expected {SVHN_FORMAT})")
    x, y = np.asarray(m["X"]), np.asarray(m["y"])
    numeric = all(np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)
                  for a in (x, y))
    if not numeric or x.ndim != 4 or x.shape[:3] != (32, 32, 3) or y.size != x.shape[3]:
        raise DataFormatError(f"{path}: X shape {x.shape} ({x.dtype}) with {y.size} labels "
                              f"(expected {SVHN_FORMAT})")
    if x.dtype != np.uint8 and (x.size and (x.min() < 0 or x.max() > 255)):
        raise DataFormatError(f"{path}: X values outside 0..255 (expected {SVHN_FORMAT})")
    if y.size and (y.min() < 0 or y.max() > 10 or not np.array_equal(y, np.round(y))):
        raise DataFormatError(f"{path}: labels not integers in 0..10 (expected {SVHN_FORMAT})")
    x = x.astype(np.uint8, copy=False).transpose(3, 2, 0, 1)
    return np.ascontiguousarray(x), y.astype(np.int64).reshape(-1) % 10


def read_image_folder(
    root: Path, size: tuple[int, int], mode: str, classes: Sequence[str] | None = None,
    max_bad_frac: float = 0.01,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """root/<class>/<image> -> (N x C x H x W uint8, labels, class names).

    A few unreadable images are skipped (notMNIST ships some broken PNGs); more than
    `max_bad_frac` of them is treated as a corrupt dataset.
    """
    try:
        from PIL import Image
    except ImportError as e:
        raise DataFormatError(f"reading the image folder {root} needs Pillow") from e
    if not root.is_dir():
        raise DataFormatError(f"missing image folder {root} (expected root/<class>/<images>)")
    if classes is None:
        classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise DataFormatError(f"{root} holds no class sub-folders (expected root/<class>/<images>)")
    xs, ys, bad = [], [], []
    for label, c in enumerate(classes):
        cdir = root / c
        if not cdir.is_dir():
            raise DataFormatError(f"missing class folder {cdir} (expected root/<class>/<images> "
                                  f"with classes {list(classes)})")
        for p in sorted(cdir.iterdir()):
            try:
                with Image.open(p) as im:
                    im = im.convert(mode)
                    if im.size != (size[1], size[0]):
                        im = im.resize((size[1], size[0]), Image.BILINEAR)
                    a = np.asarray(im, dtype=np.uint8)
            except Exception:
                bad.append(p)
                continue
            xs.append(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))
            ys.append(label)
    total = len(xs) + len(bad)
    if not xs or len(bad) > max_bad_frac * total:
        raise DataFormatError(
            f"{root}: {len(bad)} of {total} images unreadable (e.g. {bad[:3]}); "
            "expected a folder per class of image files")
    return np.stack(xs), np.asarray(ys, dtype=np.int64), list(classes)


def read_pickle_arrays(path: Path, fmt: str, trust_pickles: bool | None = None) -> dict:
    """A pickled dict of arrays (mini-ImageNet), restricted as :func:`read_cifar_batch`."""
    d = _unpickle(Path(path), fmt, "latin1", trust_pickles)
    if not isinstance(d, dict):
        raise DataFormatError(f"{path}: unpickled a {type(d).__name__} (expected {fmt})")
    return d
