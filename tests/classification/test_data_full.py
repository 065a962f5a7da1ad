"""Full-benchmark loaders on tiny synthetic files: SVHN .mat, the mixture5 assembly,
mini-ImageNet (pickles, cache pickles, image folders) and their error paths.

Every error must be a `DataFormatError` naming the file (or folder) and the expected
format, never a bare KeyError/IndexError/ValueError from deep inside a reader.
"""

from __future__ import annotations

import pickle
import re
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from blip.classification.data import DataFormatError, load_benchmark
from blip.classification.data.formats import read_svhn_mat

try:  # SVHN's .mat files need scipy (a dependency of scikit-learn, the `data` extra)
    import scipy.io as sio
except ImportError:  # pragma: no cover
    sio = None
needs_scipy = pytest.mark.skipif(sio is None, reason="reading/writing SVHN .mat needs scipy")

MIXTURE_NAMES = ["cifar10", "notmnist", "mnist", "svhn", "fashion-mnist"]  # before shuffling


# -- writers for the on-disk formats -------------------------------------------------------


def _write_idx(path: Path, arr: np.ndarray) -> None:
    head = bytes([0, 0, 0x08, arr.ndim]) + b"".join(struct.pack(">i", d) for d in arr.shape)
    path.write_bytes(head + arr.astype(np.uint8).tobytes())


def _write_idx_set(root: Path, name: str, n_train: int, n_test: int, seed: int) -> None:
    raw = root / name / "raw"
    raw.mkdir(parents=True)
    rng = np.random.RandomState(seed)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.randint(0, 256, (n, 28, 28)))
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", rng.permutation(np.arange(n) % 10))


def _write_cifar10(root: Path, n: int = 12) -> None:
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rng = np.random.RandomState(10)
    for f in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.randint(0, 256, (n, 3072)).astype(np.uint8),
                 b"labels": [int(v) for v in rng.randint(0, 10, n)]}
        with (d / f).open("wb") as fh:
            pickle.dump(batch, fh)


def _svhn_arrays(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.RandomState(seed)
    x = rng.randint(0, 256, (32, 32, 3, n)).astype(np.uint8)
    y = (np.arange(n) % 10 + 1).astype(np.uint8).reshape(n, 1)  # 1..10, 10 is digit 0
    return x, y


def _write_svhn(d: Path, n_train: int = 30, n_test: int = 20) -> None:
    d.mkdir(parents=True, exist_ok=True)
    for name, n, seed in (("train_32x32.mat", n_train, 1), ("test_32x32.mat", n_test, 2)):
        x, y = _svhn_arrays(n, seed)
        sio.savemat(str(d / name), {"X": x, "y": y})


def _write_notmnist(root: Path, per_class: int = 4) -> None:
    from PIL import Image

    rng = np.random.RandomState(3)
    for c in "ABCDEFGHIJ":
        cdir = root / "notMNIST_small" / c
        cdir.mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.randint(0, 256, (28, 28)).astype(np.uint8)).save(cdir / f"{i}.png")


@pytest.fixture
def mixture_dir(tmp_path: Path) -> Path:
    """All five mixture5 datasets, tiny: train/test = 60/12, 32/8 (notMNIST 40 split 1/5),
    40/20, 30/20 and 50/10 images."""
    pytest.importorskip("PIL")
    _write_cifar10(tmp_path)
    _write_notmnist(tmp_path)
    _write_idx_set(tmp_path, "MNIST", 40, 20, seed=4)
    _write_svhn(tmp_path / "svhn")  # a searched sub-folder
    _write_idx_set(tmp_path, "FashionMNIST", 50, 10, seed=5)
    return tmp_path


def _rows(x: torch.Tensor) -> set[bytes]:
    return {r.numpy().tobytes() for r in x}


# -- SVHN ----------------------------------------------------------------------------------


@needs_scipy
def test_svhn_mat_reader(tmp_path: Path) -> None:
    x_raw, y_raw = _svhn_arrays(25, seed=0)
    sio.savemat(str(tmp_path / "train_32x32.mat"), {"X": x_raw, "y": y_raw})
    x, y = read_svhn_mat(tmp_path / "train_32x32.mat")
    assert x.shape == (25, 3, 32, 32) and x.dtype == np.uint8 and x.flags.c_contiguous
    assert y.shape == (25,) and y.dtype == np.int64
    for i in (0, 9, 24):  # image i is X[:, :, :, i] in channel-first layout
        assert np.array_equal(x[i], x_raw[:, :, :, i].transpose(2, 0, 1))
    assert np.array_equal(y, y_raw.reshape(-1) % 10)
    assert y[9] == 0 and y_raw[9, 0] == 10  # label 10 is digit 0
    assert sorted(set(y.tolist())) == list(range(10))


def _bad_svhn(tmp_path: Path, kind: str) -> Path:
    p = tmp_path / "train_32x32.mat"
    x, y = _svhn_arrays(6, seed=0)
    if kind == "garbage":
        p.write_bytes(b"<html>403 Forbidden</html>" * 8)
        return p
    contents = {
        "wrong-keys": {"images": x, "labels": y},
        "wrong-shape": {"X": x[:28], "y": y},
        "channels-first": {"X": x.transpose(3, 2, 0, 1), "y": y},
        "label-count": {"X": x, "y": y[:4]},
        "label-range": {"X": x, "y": y + 5},
        "pixel-range": {"X": x.astype(np.float64) * 2, "y": y},
        "flat-X": {"X": x.reshape(-1, 6), "y": y},
    }[kind]
    sio.savemat(str(p), contents)
    return p


@needs_scipy
@pytest.mark.parametrize("kind", ["garbage", "wrong-keys", "wrong-shape", "channels-first",
                                  "label-count", "label-range", "pixel-range", "flat-X"])
def test_svhn_corrupt_mat_errors(tmp_path: Path, kind: str) -> None:
    p = _bad_svhn(tmp_path, kind)
    with pytest.raises(DataFormatError, match=rf"{re.escape(str(p))}.*SVHN cropped-digits .mat"):
        read_svhn_mat(p)


@needs_scipy
def test_svhn_missing_file(tmp_path: Path) -> None:
    from blip.classification.data.full import load_svhn

    with pytest.raises(DataFormatError, match=r"train_32x32\.mat.*SVHN cropped-digits"):
        load_svhn(tmp_path)
    _write_svhn(tmp_path / "SVHN")
    (tmp_path / "SVHN" / "test_32x32.mat").unlink()
    with pytest.raises(DataFormatError, match=r"test_32x32\.mat.*SVHN.*looked for"):
        load_svhn(tmp_path)


# -- mixture5 ------------------------------------------------------------------------------


@needs_scipy
def test_mixture5_assembly(mixture_dir: Path) -> None:
    seed = 2
    s = load_benchmark("mixture5", data_dir=mixture_dir, seed=seed)
    # the authors shuffle the dataset order with the run seed (sklearn.utils.shuffle)
    order = [MIXTURE_NAMES[i] for i in np.random.RandomState(seed).permutation(5)]
    assert [t.name for t in s] == order and order != MIXTURE_NAMES
    assert len(s) == 5 and s.classes_per_task == [10] * 5 and s.input_shape == (3, 32, 32)
    n_train_file = {"cifar10": 60, "notmnist": 32, "mnist": 40, "svhn": 30, "fashion-mnist": 50}
    n_test_file = {"cifar10": 12, "notmnist": 8, "mnist": 20, "svhn": 20, "fashion-mnist": 10}
    for t in s:
        n_tr, n_va, n_te = t.sizes()
        n = n_train_file[t.name]
        assert n_va == int(0.15 * n) and n_tr == n - n_va and n_te == n_test_file[t.name], t.name
        for x, y in ((t.x_train, t.y_train), (t.x_valid, t.y_valid), (t.x_test, t.y_test)):
            assert x.dtype == torch.uint8 and x.shape[1:] == (3, 32, 32), t.name
            assert y.dtype == torch.int64 and int(y.min()) >= 0 and int(y.max()) <= 9
        tr, va, te = _rows(t.x_train), _rows(t.x_valid), _rows(t.x_test)
        assert len(tr) == n_tr and not tr & va and not tr & te and not va & te, t.name
        x_in = t.inputs(t.x_test)
        assert x_in.dtype == torch.float32 and x_in.shape == (n_te, 3, 32, 32)
        assert torch.isfinite(x_in).all()

    by_name = {t.name: t for t in s}
    # grayscale sets: 28x28 zero-padded by 2 to 32x32 and replicated over 3 channels
    for name, folder in (("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST")):
        t = by_name[name]
        x = torch.cat([t.x_train, t.x_valid])
        assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])
        border = torch.ones(32, 32, dtype=torch.bool)
        border[2:30, 2:30] = False
        assert int(x[:, :, border].max()) == 0
        raw = np.frombuffer(bytearray((mixture_dir / folder / "raw" / "train-images-idx3-ubyte")
                                      .read_bytes()[16:]), np.uint8).reshape(-1, 28, 28)
        assert _rows(x[:, 0, 2:30, 2:30]) == _rows(torch.from_numpy(raw))
        # normalised with the single gray mean/std on every channel, padding included
        x_in = t.inputs(t.x_test[:2])
        assert torch.allclose(x_in[:, :, 0, 0], torch.full((2, 3), -t.mean[0] / t.std[0]))
    t = by_name["notmnist"]
    assert torch.equal(t.x_test[:, 0], t.x_test[:, 2])
    assert set(torch.cat([t.y_train, t.y_valid, t.y_test]).unique().tolist()) == set(range(10))
    # SVHN keeps its colour channels and maps label 10 to digit 0
    t = by_name["svhn"]
    x_raw, y_raw = _svhn_arrays(20, seed=2)
    assert torch.equal(t.x_test, torch.from_numpy(x_raw.transpose(3, 2, 0, 1).copy()))
    assert torch.equal(t.y_test, torch.from_numpy(y_raw.reshape(-1) % 10).long())
    assert not torch.equal(t.x_test[:, 0], t.x_test[:, 1])


@needs_scipy
def test_mixture5_deterministic_per_seed(mixture_dir: Path) -> None:
    a, b = (load_benchmark("mixture5", data_dir=mixture_dir, seed=7) for _ in range(2))
    assert [t.name for t in a] == [t.name for t in b]
    for ta, tb in zip(a, b, strict=True):
        for k in ("x_train", "y_train", "x_valid", "y_valid", "x_test", "y_test"):
            assert torch.equal(getattr(ta, k), getattr(tb, k)), (ta.name, k)
    c = load_benchmark("mixture5", data_dir=mixture_dir, seed=8)
    assert [t.name for t in c] != [t.name for t in a]  # the order follows the seed
    mnist_a, mnist_c = ({t.name: t for t in s}["mnist"] for s in (a, c))
    assert _rows(mnist_a.x_valid) != _rows(mnist_c.x_valid)  # and so does the valid split


@needs_scipy
@pytest.mark.parametrize("missing, pattern", [
    ("cifar10", r"data_batch_1.*CIFAR python pickle"),
    ("notmnist", r"notMNIST.*notMNIST_small/<A\.\.J>/\*\.png"),
    ("mnist", r"'train-images-idx3-ubyte'.*IDX.*[/\\]MNIST[/\\]raw"),
    ("svhn", r"'train_32x32\.mat'.*SVHN cropped-digits"),
    ("fashion-mnist", r"'train-images-idx3-ubyte'.*IDX.*FashionMNIST[/\\]raw"),
])
def test_mixture5_missing_dataset(mixture_dir: Path, missing: str, pattern: str) -> None:
    where = {"cifar10": "cifar-10-batches-py", "notmnist": "notMNIST_small", "mnist": "MNIST",
             "svhn": "svhn", "fashion-mnist": "FashionMNIST"}[missing]
    shutil.rmtree(mixture_dir / where)
    with pytest.raises(DataFormatError, match=pattern):
        load_benchmark("mixture5", data_dir=mixture_dir, seed=0)


@needs_scipy
def test_mixture5_notmnist_missing_letter(mixture_dir: Path) -> None:
    shutil.rmtree(mixture_dir / "notMNIST_small" / "J")
    with pytest.raises(DataFormatError, match=r"notMNIST_small[/\\]J.*<class>"):
        load_benchmark("mixture5", data_dir=mixture_dir, seed=0)


def test_idx_and_cifar_labels_out_of_range(tmp_path: Path) -> None:
    _write_idx_set(tmp_path, "MNIST", 20, 10, seed=0)
    _write_idx(tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte", np.full(10, 200))
    with pytest.raises(DataFormatError, match=r"t10k-labels-idx1-ubyte: labels up to 200"):
        load_benchmark("mnist5", data_dir=tmp_path)
    _write_cifar10(tmp_path)
    p = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    with p.open("wb") as fh:  # a CIFAR-100 batch put in the CIFAR-10 folder
        pickle.dump({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 50, 99]}, fh)
    from blip.classification.data.full import load_cifar

    with pytest.raises(DataFormatError, match=r"data_batch_3: labels 0\.\.99.*CIFAR-10"):
        load_cifar(tmp_path, 10)


# -- mini-ImageNet -------------------------------------------------------------------------


def _mini_images(labels: np.ndarray, size: int = 84) -> np.ndarray:
    """N x size x size x 3 uint8; pixel [0, 0, 0] holds the (global) class id."""
    rng = np.random.RandomState(len(labels))
    x = rng.randint(0, 256, (len(labels), size, size, 3)).astype(np.uint8)
    x[:, 0, 0, 0] = labels
    return x


def _dump(path: Path, obj: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as fh:
        pickle.dump(obj, fh)
    return path


def _write_mini_cache(root: Path, per_class: int = 6) -> None:
    """mini-imagenet-cache-{train,val,test}.pkl: 64 + 16 + 20 classes, images shuffled."""
    first = 0
    for split, n_cls in (("train", 64), ("val", 16), ("test", 20)):
        labels = np.random.RandomState(n_cls).permutation(np.repeat(np.arange(n_cls), per_class))
        class_dict = {f"n{first + c:03d}": np.flatnonzero(labels == c).tolist()
                      for c in range(n_cls)}
        _dump(root / f"mini-imagenet-cache-{split}.pkl",
              {"image_data": _mini_images(labels + first), "class_dict": class_dict})
        first += n_cls


def _check_mini_stream(s, shape=(3, 84, 84), seed: int = 0) -> None:
    assert len(s) == 20 and s.classes_per_task == [5] * 20 and s.input_shape == shape
    # the authors' draw (MI/dataloaders/miniimagenet.py): np.random.seed(seed), then
    # np.split(np.random.permutation(100), 20); label i = the task's i-th class
    np.random.seed(seed)
    task_classes = np.split(np.random.permutation(100), 20)
    for t_idx, t in enumerate(s):
        classes = torch.from_numpy(task_classes[t_idx]).long()
        for x, y in ((t.x_train, t.y_train), (t.x_valid, t.y_valid), (t.x_test, t.y_test)):
            assert x.dtype == torch.uint8 and x.shape[1:] == shape
            assert set(y.tolist()) <= set(range(5))
            # each image is in its own class, and task t holds the classes drawn for it
            assert torch.equal(x[:, 0, 0, 0].long(), classes[y])
        assert set(t.y_train.tolist()) == set(range(5))


def test_miniimagenet_cache_pickles(tmp_path: Path) -> None:
    _write_mini_cache(tmp_path / "miniimagenet")
    s = load_benchmark("miniimagenet", data_dir=tmp_path, seed=1)
    _check_mini_stream(s, seed=1)
    # per class 1/6 to test (1 of 6), then 2% of each task's 25 train images (0) to valid
    assert all(t.sizes() == (25, 0, 5) for t in s)
    t = s[13]
    tr, va, te = _rows(t.x_train), _rows(t.x_valid), _rows(t.x_test)
    assert not tr & va and not tr & te and not va & te
    assert torch.equal(load_benchmark("miniimagenet", data_dir=tmp_path, seed=1)[13].x_test,
                       t.x_test)
    x_in = t.inputs(t.x_test)
    assert x_in.shape == (5, 3, 84, 84) and x_in.dtype == torch.float32


def test_miniimagenet_train_test_pickles(tmp_path: Path) -> None:
    y_tr, y_te = np.repeat(np.arange(100), 10), np.repeat(np.arange(100), 1)
    for name, y in (("train.pkl", y_tr), ("test.pkl", y_te)):
        _dump(tmp_path / "miniimagenet" / name, {"images": _mini_images(y, 16), "labels": y})
    s = load_benchmark("miniimagenet", data_dir=tmp_path)
    _check_mini_stream(s, (3, 16, 16))
    # 2% of a task's 50 train images to valid (the authors' --pc-valid 0.02); the test
    # pickle is the test set
    assert all(t.sizes() == (49, 1, 5) for t in s)


def test_miniimagenet_image_folder(tmp_path: Path) -> None:
    Image = pytest.importorskip("PIL.Image")

    root = tmp_path / "miniimagenet" / "images"
    for c in range(100):
        (root / f"n{c:03d}").mkdir(parents=True)
        for i in range(6):
            a = np.full((10, 12, 3), (c, i, 7), np.uint8)  # resized to 84 x 84
            Image.fromarray(a).save(root / f"n{c:03d}" / f"{i}.png")
    (root / "n042" / "Thumbs.db").write_bytes(b"not an image")  # 1 of 601: skipped
    s = load_benchmark("miniimagenet", data_dir=tmp_path)
    _check_mini_stream(s)
    assert sum(sum(t.sizes()) for t in s) == 600
    # too few classes (a folder lost): named, with the class count
    shutil.rmtree(root / "n099")
    with pytest.raises(DataFormatError, match=rf"{re.escape(str(tmp_path))}.* 99 classes.*100"):
        load_benchmark("miniimagenet", data_dir=tmp_path)
    # many non-images: a corrupt folder, not silently dropped images
    for i in range(10):
        (root / "n000" / f"junk{i}.jpg").write_text("<html>")
    with pytest.raises(DataFormatError, match=rf"{re.escape(str(root))}.*unreadable"):
        load_benchmark("miniimagenet", data_dir=tmp_path)


def _ok_pair(n_cls: int = 100) -> dict:
    y = np.arange(n_cls)
    return {"images": _mini_images(y, 4), "labels": y}


@pytest.mark.parametrize("kind, pattern", [
    ("no-test", r"missing data file .*test\.pkl.*mini-ImageNet"),
    ("garbage", r"cannot unpickle .*train\.pkl"),
    ("not-a-dict", r"train\.pkl: unpickled a list"),
    ("wrong-keys", r"train\.pkl: keys \['x', 'y'\]"),
    ("no-labels", r"train\.pkl: keys .*lack 'labels'/'class_dict'"),
    ("3d-images", r"train\.pkl: images of shape \(100, 4, 4\)"),
    ("one-channel", r"train\.pkl: images of shape \(100, 4, 4, 1\)"),
    ("float-images", r"train\.pkl: images of shape .*float"),
    ("ragged-images", r"train\.pkl: unreadable images"),
    ("label-count", r"train\.pkl: images \(100, 4, 4, 3\) with labels \(99,\)"),
    ("2d-labels", r"train\.pkl: images .* with labels \(100, 1\)"),
    ("string-labels", r"train\.pkl: unreadable images/labels.*not integers"),
    ("negative-labels", r"train\.pkl: negative labels"),
    ("shape-mismatch", r"disagree on the image shape.*train\.pkl.*test\.pkl"),
    ("few-classes", r"40 classes.*expected the 100"),
])
def test_miniimagenet_pickle_errors(tmp_path: Path, kind: str, pattern: str) -> None:
    d = tmp_path / "miniimagenet"
    train = _ok_pair()
    bad: object = dict(train)
    if kind == "garbage":
        d.mkdir()
        (d / "train.pkl").write_bytes(b"\x80\x04garbage")
    elif kind == "not-a-dict":
        bad = [train["images"], train["labels"]]
    elif kind == "wrong-keys":
        bad = {"x": train["images"], "y": train["labels"]}
    elif kind == "no-labels":
        bad = {"images": train["images"]}
    elif kind == "3d-images":
        bad["images"] = train["images"][..., 0]
    elif kind == "one-channel":
        bad["images"] = train["images"][..., :1]
    elif kind == "float-images":
        bad["images"] = train["images"] / 255.0
    elif kind == "ragged-images":
        bad["images"] = [np.zeros((4, 4, 3), np.uint8), np.zeros((5, 4, 3), np.uint8)]
    elif kind == "label-count":
        bad["labels"] = train["labels"][:99]
    elif kind == "2d-labels":
        bad["labels"] = train["labels"][:, None]
    elif kind == "string-labels":
        bad["labels"] = [f"n{c:08d}" for c in train["labels"]]
    elif kind == "negative-labels":
        bad["labels"] = train["labels"] - 1
    elif kind == "few-classes":
        bad = {"images": train["images"], "labels": train["labels"] % 40}
    if kind != "garbage":
        _dump(d / "train.pkl", bad)
    if kind == "shape-mismatch":
        _dump(d / "test.pkl", {"images": _mini_images(np.arange(100), 8),
                               "labels": np.arange(100)})
    elif kind != "no-test":
        _dump(d / "test.pkl", _ok_pair())
    with pytest.raises(DataFormatError, match=pattern):
        load_benchmark("miniimagenet", data_dir=tmp_path)


@pytest.mark.parametrize("kind, pattern", [
    ("index-out-of-range", r"cache-val\.pkl: unreadable images/labels.*out of bounds"),
    ("uncovered-image", r"cache-val\.pkl: negative labels, or images in no class"),
    ("missing-train", r"miniimagenet[/\\]mini-imagenet-cache-train\.pkl.*mini-ImageNet"),
])
def test_miniimagenet_cache_errors(tmp_path: Path, kind: str, pattern: str) -> None:
    d = tmp_path / "miniimagenet"
    _write_mini_cache(d, per_class=2)
    p = d / "mini-imagenet-cache-val.pkl"
    with p.open("rb") as fh:
        val = pickle.load(fh)
    first = sorted(val["class_dict"])[0]
    if kind == "index-out-of-range":
        val["class_dict"][first] = val["class_dict"][first] + [10_000]
    elif kind == "uncovered-image":
        val["class_dict"][first] = val["class_dict"][first][:1]
    else:
        (d / "mini-imagenet-cache-train.pkl").unlink()
    _dump(p, val)
    with pytest.raises(DataFormatError, match=pattern):
        load_benchmark("miniimagenet", data_dir=tmp_path)


def test_miniimagenet_missing_and_download(tmp_path: Path) -> None:
    with pytest.raises(DataFormatError, match=rf"missing mini-ImageNet under "
                                              rf"{re.escape(str(tmp_path))}.*images/<class>"):
        load_benchmark("miniimagenet", data_dir=tmp_path)
    with pytest.raises(DataFormatError, match="no downloader"):
        load_benchmark("miniimagenet", data_dir=tmp_path, download=True)
