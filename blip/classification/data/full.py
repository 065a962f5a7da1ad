"""The paper's benchmarks, read from the standard on-disk formats under `data_dir`.

Layouts searched (torchvision's first, so `--download` output is found as is):
MNIST `MNIST/raw/*-ubyte[.gz]`, FashionMNIST `FashionMNIST/raw/...`, CIFAR
`cifar-10-batches-py/`, `cifar-100-python/`, SVHN `train_32x32.mat`/`test_32x32.mat`,
notMNIST `notMNIST_small/<A..J>/*.png`, mini-ImageNet `miniimagenet/{train,test}.pkl`
or `mini-imagenet-cache-{train,val,test}.pkl` or `miniimagenet/images/<class>/*.jpg`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from . import formats as F
from .base import DataFormatError, TaskStream, make_task, shuffled_indices

CIFAR10_MEAN = tuple(v / 255 for v in (125.3, 123.0, 113.9))
CIFAR10_STD = tuple(v / 255 for v in (63.0, 62.1, 66.7))
CIFAR100_MEAN = tuple(v / 255 for v in (129.3, 124.1, 112.4))
CIFAR100_STD = tuple(v / 255 for v in (68.2, 65.4, 70.4))
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

_IDX_NAMES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _torchvision_download(name: str, data_dir: Path) -> None:
    """Fetch a dataset with torchvision's downloader into its standard layout."""
    try:
        import torchvision.datasets as tvd
    except ImportError as e:
        raise DataFormatError(f"--download of {name} needs torchvision; install it or put "
                              f"the files under {data_dir}") from e
    root = str(data_dir)
    if name in ("MNIST", "FashionMNIST", "CIFAR10", "CIFAR100"):
        for train in (True, False):
            getattr(tvd, name)(root, train=train, download=True)
    elif name == "SVHN":
        for split in ("train", "test"):
            tvd.SVHN(root, split=split, download=True)
    else:
        raise DataFormatError(f"{name} has no torchvision downloader; put it under {data_dir}")


def _ensure(name: str, data_dir: Path, download: bool, probe: list[Path]) -> None:
    if download and not any(p.exists() for p in probe):
        _torchvision_download(name, data_dir)


def load_idx_dataset(data_dir: Path, name: str = "MNIST", download: bool = False):
    """(x_train, y_train, x_test, y_test) as uint8 N x 1 x 28 x 28 and int64 labels."""
    dirs = [data_dir / name / "raw", data_dir / name, data_dir / name.lower(), data_dir]
    _ensure(name, data_dir, download, [data_dir / name])
    out = []
    for split in ("train", "test"):
        xi, yi = _IDX_NAMES[split]
        x_path = F.find_file(dirs, [xi, xi + ".gz", xi.replace("-idx", ".idx")], F.IDX_FORMAT)
        y_path = F.find_file(dirs, [yi, yi + ".gz", yi.replace("-idx", ".idx")], F.IDX_FORMAT)
        x, y = F.read_idx_pair(x_path, y_path, image_shape=(28, 28))
        if y.size and y.max() > 9:
            raise DataFormatError(f"{y_path}: labels up to {int(y.max())}, expected digits/classes "
                                  f"0..9 ({F.IDX_FORMAT})")
        out += [torch.from_numpy(x).unsqueeze(1), torch.from_numpy(y.astype(np.int64))]
    return tuple(out)


def load_cifar(data_dir: Path, which: int = 10, download: bool = False):
    sub = "cifar-10-batches-py" if which == 10 else "cifar-100-python"
    _ensure(f"CIFAR{which}", data_dir, download, [data_dir / sub])
    d = data_dir / sub
    train_files = [f"data_batch_{i}" for i in range(1, 6)] if which == 10 else ["train"]
    test_files = ["test_batch"] if which == 10 else ["test"]
    parts = {}
    for split, files in (("train", train_files), ("test", test_files)):
        xs, ys = zip(*(F.read_cifar_batch(d / f) for f in files), strict=True)
        for f, y in zip(files, ys, strict=True):
            if y.size and (y.min() < 0 or y.max() >= which):
                raise DataFormatError(f"{d / f}: labels {int(y.min())}..{int(y.max())}, expected "
                                      f"0..{which - 1} for CIFAR-{which} ({F.CIFAR_FORMAT})")
        parts[split] = (torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys)))
    return (*parts["train"], *parts["test"])


def _pad_gray_to_rgb32(x: torch.Tensor) -> torch.Tensor:
    """N x 1 x 28 x 28 -> N x 3 x 32 x 32 (zero pad 2, repeat channels), as the authors."""
    x = torch.nn.functional.pad(x, (2, 2, 2, 2))
    return x.expand(-1, 3, -1, -1).contiguous()


def mnist5(data_dir: Path, seed: int = 0, download: bool = False) -> TaskStream:
    xtr, ytr, xte, yte = load_idx_dataset(data_dir, "MNIST", download)
    tasks = []
    for t in range(5):
        a, b = 2 * t, 2 * t + 1
        mtr, mte = (ytr == a) | (ytr == b), (yte == a) | (yte == b)
        tasks.append(make_task(f"mnist-{a}/{b}", 2, xtr[mtr], ytr[mtr] - a, xte[mte],
                               yte[mte] - a, 0.1, seed, (0.1307,), (0.3081,)))
    return TaskStream("mnist5", tasks, (1, 28, 28), {"seed": seed})


def pmnist(data_dir: Path, seed: int = 0, download: bool = False, n_tasks: int = 10) -> TaskStream:
    """The authors' PMNIST: every task permuted (seeded by the run seed), and the
    training set doubles as the validation set (their pc_valid = 0)."""
    xtr, ytr, xte, yte = load_idx_dataset(data_dir, "MNIST", download)
    xtr, xte = xtr.reshape(len(xtr), -1), xte.reshape(len(xte), -1)
    order = shuffled_indices(n_tasks, seed)
    tasks = []
    for i, r in enumerate(order):
        p = torch.from_numpy(shuffled_indices(784, int(r) * 100 + i))
        tasks.append(make_task(f"pmnist-{i}", 10, xtr[:, p].reshape(-1, 1, 28, 28), ytr,
                               xte[:, p].reshape(-1, 1, 28, 28), yte, 0.0, seed,
                               (0.1307,), (0.3081,)))
    return TaskStream("pmnist", tasks, (1, 28, 28), {"seed": seed})


def cifar_alt(data_dir: Path, seed: int = 0, download: bool = False) -> TaskStream:
    """Alternating CIFAR-10/100: CIFAR-10 in 5 tasks of 2 classes interleaved with
    CIFAR-100 in 5 tasks of 20 classes (c10-0, c100-0, c10-1, ...)."""
    c10 = load_cifar(data_dir, 10, download)
    c100 = load_cifar(data_dir, 100, download)
    tasks = []
    for t in range(5):
        for (xtr, ytr, xte, yte), k, tag, mean, std in (
            (c10, 2, "cifar10", CIFAR10_MEAN, CIFAR10_STD),
            (c100, 20, "cifar100", CIFAR100_MEAN, CIFAR100_STD),
        ):
            lo = k * t
            mtr, mte = (ytr >= lo) & (ytr < lo + k), (yte >= lo) & (yte < lo + k)
            tasks.append(make_task(f"{tag}-{t}", k, xtr[mtr], ytr[mtr] - lo, xte[mte],
                                   yte[mte] - lo, 0.1, seed, mean, std))
    return TaskStream("cifar-alt", tasks, (3, 32, 32), {"seed": seed})


def load_notmnist(data_dir: Path, seed: int = 0):
    """notMNIST letters A-J from image folders; the small set is split 1/5 for test
    with the run seed unless train/ and test/ folders exist."""
    letters = list("ABCDEFGHIJ")
    for base in (data_dir / "notMNIST", data_dir / "notmnist", data_dir):
        if (base / "train").is_dir() and (base / "test").is_dir():
            xtr, ytr, _ = F.read_image_folder(base / "train", (28, 28), "L", letters)
            xte, yte, _ = F.read_image_folder(base / "test", (28, 28), "L", letters)
            return torch.from_numpy(xtr), torch.from_numpy(ytr), torch.from_numpy(xte), \
                torch.from_numpy(yte)
    for base in (data_dir / "notMNIST_small", data_dir / "notmnist" / "notMNIST_small",
                 data_dir / "notMNIST_large"):
        if base.is_dir():
            x, y, _ = F.read_image_folder(base, (28, 28), "L", letters)
            r = torch.from_numpy(shuffled_indices(len(y), seed))
            n_test = len(r) // 5
            x, y = torch.from_numpy(x)[r], torch.from_numpy(y)[r]
            return x[n_test:], y[n_test:], x[:n_test], y[:n_test]
    raise DataFormatError(
        f"missing notMNIST under {data_dir}: expected notMNIST_small/<A..J>/*.png "
        "(or notMNIST/train and notMNIST/test with letter folders); no torchvision downloader")


def load_svhn(data_dir: Path, download: bool = False):
    dirs = [data_dir, data_dir / "svhn", data_dir / "SVHN"]
    _ensure("SVHN", data_dir, download, [d / "train_32x32.mat" for d in dirs])
    xtr, ytr = F.read_svhn_mat(F.find_file(dirs, ["train_32x32.mat"], F.SVHN_FORMAT))
    xte, yte = F.read_svhn_mat(F.find_file(dirs, ["test_32x32.mat"], F.SVHN_FORMAT))
    return (torch.from_numpy(xtr), torch.from_numpy(ytr), torch.from_numpy(xte),
            torch.from_numpy(yte))


def mixture5(data_dir: Path, seed: int = 0, download: bool = False) -> TaskStream:
    """CIFAR-10, notMNIST, MNIST, SVHN, FashionMNIST at 3x32x32; as the authors, the
    task order is shuffled with the run seed and 15% of train is held out."""
    stats = {  # the authors' normalisations (gray sets: including the 2-pixel padding)
        "cifar10": (CIFAR10_MEAN, CIFAR10_STD),
        "notmnist": ((0.4254,), (0.4501,)),
        "mnist": ((0.1,), (0.2752,)),
        "svhn": ((0.4377, 0.4438, 0.4728), (0.198, 0.201, 0.197)),
        "fashion-mnist": ((0.2190,), (0.3318,)),
    }
    names = list(stats)
    tasks = []
    for idx in shuffled_indices(5, seed):
        name = names[idx]
        if name == "cifar10":
            xtr, ytr, xte, yte = load_cifar(data_dir, 10, download)
        elif name == "svhn":
            xtr, ytr, xte, yte = load_svhn(data_dir, download)
        else:
            if name == "notmnist":
                xtr, ytr, xte, yte = load_notmnist(data_dir, seed)
            else:
                tv = "MNIST" if name == "mnist" else "FashionMNIST"
                xtr, ytr, xte, yte = load_idx_dataset(data_dir, tv, download)
            xtr, xte = _pad_gray_to_rgb32(xtr), _pad_gray_to_rgb32(xte)
        mean, std = stats[name]
        tasks.append(make_task(name, 10, xtr, ytr, xte, yte, 0.15, seed, mean, std))
    return TaskStream("mixture5", tasks, (3, 32, 32), {"seed": seed})


MINI_FORMAT = (
    "mini-ImageNet: train.pkl/test.pkl dicts with 'images' (N x 84 x 84 x 3 uint8) and "
    "'labels', or mini-imagenet-cache-{train,val,test}.pkl with 'image_data' and "
    "'class_dict', or images/<class>/*.jpg"
)


def _mini_arrays(d: dict, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A mini-ImageNet pickle's dict -> (N x 3 x H x W uint8, labels 0..K-1)."""
    x = d.get("images", d.get("image_data", d.get("data")))
    if x is None:
        raise DataFormatError(f"{path}: keys {sorted(map(str, d))} lack 'images'/'image_data' "
                              f"(expected {MINI_FORMAT})")
    try:
        x = np.asarray(x)
        if "labels" in d:
            y = np.asarray(d["labels"])
            if y.dtype.kind not in "iu":
                raise ValueError(f"labels of dtype {y.dtype}, not integers")
            y = y.astype(np.int64)
        elif "class_dict" in d:
            y = np.full(len(x), -1, dtype=np.int64)
            for c, name in enumerate(sorted(d["class_dict"])):
                y[np.asarray(d["class_dict"][name], dtype=np.int64)] = c
        else:
            raise DataFormatError(f"{path}: keys {sorted(map(str, d))} lack 'labels'/'class_dict' "
                                  f"(expected {MINI_FORMAT})")
    except (ValueError, TypeError, IndexError) as e:
        raise DataFormatError(f"{path}: unreadable images/labels: {e} (expected {MINI_FORMAT})") \
            from e
    if x.dtype.kind not in "iu" or x.ndim != 4 or 3 not in (x.shape[1], x.shape[-1]):
        raise DataFormatError(f"{path}: images of shape {x.shape} ({x.dtype}), expected "
                              f"N x H x W x 3 integers ({MINI_FORMAT})")
    if y.ndim != 1 or len(x) != len(y) or len(y) == 0:
        raise DataFormatError(f"{path}: images {x.shape} with labels {y.shape} ({MINI_FORMAT})")
    if y.min() < 0:
        raise DataFormatError(f"{path}: negative labels, or images in no class of 'class_dict' "
                              f"({MINI_FORMAT})")
    if x.dtype != np.uint8 and (x.min() < 0 or x.max() > 255):  # (a full pass: not for uint8)
        raise DataFormatError(f"{path}: pixel values outside 0..255 ({MINI_FORMAT})")
    if x.shape[-1] == 3:
        x = x.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(x, dtype=np.uint8), y


def _same_image_shape(parts: list[tuple[Path, np.ndarray]]) -> None:
    shapes = {tuple(x.shape[1:]) for _, x in parts}
    if len(shapes) > 1:
        desc = ", ".join(f"{p}: {tuple(x.shape[1:])}" for p, x in parts)
        raise DataFormatError(f"mini-ImageNet files disagree on the image shape ({desc}); "
                              f"expected {MINI_FORMAT}")


def load_miniimagenet(data_dir: Path, seed: int = 0):
    base = data_dir / "miniimagenet"
    for b in (base, data_dir):
        if (b / "train.pkl").is_file() or (b / "test.pkl").is_file():
            ptr, pte = b / "train.pkl", b / "test.pkl"
            xtr, ytr = _mini_arrays(F.read_pickle_arrays(ptr, MINI_FORMAT), ptr)
            xte, yte = _mini_arrays(F.read_pickle_arrays(pte, MINI_FORMAT), pte)
            _same_image_shape([(ptr, xtr), (pte, xte)])
            return xtr, ytr, xte, yte
    cache = [b / f"mini-imagenet-cache-{s}.pkl" for b in (base, data_dir)
             for s in ("train", "val", "test")]
    found = [p for p in cache if p.is_file()]
    if found:
        root = found[0].parent  # the folder holding the cache files (all three needed)
        xs, ys, off, parts = [], [], 0, []
        for s in ("train", "val", "test"):  # 64 + 16 + 20 classes = the 100 classes
            p = root / f"mini-imagenet-cache-{s}.pkl"
            x, y = _mini_arrays(F.read_pickle_arrays(p, MINI_FORMAT), p)
            parts.append((p, x))
            xs.append(x)
            ys.append(y + off)
            off += int(y.max()) + 1
        _same_image_shape(parts)
        x, y = np.concatenate(xs), np.concatenate(ys)
    elif (base / "images").is_dir():
        x, y, _ = F.read_image_folder(base / "images", (84, 84), "RGB")
    else:
        raise DataFormatError(f"missing mini-ImageNet under {data_dir} (expected {MINI_FORMAT})")
    # The authors' split (MI/data/generate_train_test_split.py): one generator seeded 1234
    # for the benchmark (not the run), each class shuffled in turn, its first 500 of 600
    # images to train and the rest to test; here the last 1/6 of each class to test. Their
    # class ids follow os.listdir order: only their train.pkl/test.pkl give their exact split.
    del seed
    rng = np.random.RandomState(1234)
    test = np.zeros(len(y), dtype=bool)
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        test[idx[len(idx) - len(idx) // 6:]] = True
    return x[~test], y[~test], x[test], y[test]


#: the authors' validation share (MI/run_blip.py:23, --pc-valid default 0.02)
MINI_VALID_FRAC = 0.02


def mini_task_classes(seed: int, n_tasks: int = 20, n_classes: int = 100) -> list[np.ndarray]:
    """Each task's classes, as the authors draw them (MI/dataloaders/miniimagenet.py,
    DatasetGen: np.random.seed(seed); np.split(np.random.permutation(100), ntasks)); a
    task's label i is its i-th class in that list."""
    return np.split(np.random.RandomState(seed).permutation(n_classes), n_tasks)


def miniimagenet(data_dir: Path, seed: int = 0, download: bool = False) -> TaskStream:
    """20 tasks of 5 classes drawn by the run seed as the authors' (mini_task_classes); 2% of
    each task's train held out for validation (their --pc-valid; they split with torch's
    random_split, we with the seeded shuffle of every loader here)."""
    if download:
        raise DataFormatError("mini-ImageNet has no downloader here; place the files under "
                              f"{data_dir} ({MINI_FORMAT})")
    xtr, ytr, xte, yte = (torch.from_numpy(a) for a in load_miniimagenet(data_dir, seed))
    present = set(ytr.unique().tolist())
    if present != set(range(100)) or not set(yte.unique().tolist()) <= present:
        missing = sorted(set(range(100)) - present)[:5]
        raise DataFormatError(
            f"mini-ImageNet under {data_dir} has training images for {len(present)} classes "
            f"(labels {min(present)}..{max(present)}; missing e.g. {missing}); expected the 100 "
            f"classes labelled 0..99 in train and test ({MINI_FORMAT})")
    tasks = []
    for t, classes in enumerate(mini_task_classes(seed)):
        label = torch.full((100,), -1, dtype=torch.long)
        label[torch.from_numpy(classes)] = torch.arange(len(classes))
        mtr, mte = label[ytr] >= 0, label[yte] >= 0
        tasks.append(make_task(f"miniimagenet-{t}", 5, xtr[mtr], label[ytr[mtr]], xte[mte],
                               label[yte[mte]], MINI_VALID_FRAC, seed, IMAGENET_MEAN,
                               IMAGENET_STD))
    return TaskStream("miniimagenet", tasks, tuple(xtr.shape[1:]), {"seed": seed})
