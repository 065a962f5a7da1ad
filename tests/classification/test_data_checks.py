"""Data readers check dtype, value range and shape of what they read and name the file
(issue 11 finding 12)."""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np
import pytest

from blip.classification.data import DataFormatError
from blip.classification.data.formats import read_cifar_batch, read_idx, read_idx_pair

# -- data readers check what they read --------------------------------------------------------


def _cifar(path: Path, data: object, labels: object) -> Path:
    with path.open("wb") as f:
        pickle.dump({b"data": data, b"labels": labels}, f)
    return path


@pytest.mark.parametrize(("data", "labels", "match"), [
    (np.full((2, 3072), 300, dtype=np.int64), [0, 1], r"pixels range 300..300, outside 0..255"),
    (np.zeros((2, 3072), dtype=np.uint8), [0.0, 1.5], r"labels of dtype float64 are not integers"),
    (np.zeros((2, 3072), dtype=np.uint8), ["cat", "dog"], r"labels of dtype <U3 are not integers"),
    (np.zeros((2, 3072), dtype=np.uint8), [0, -1], r"labels range -1..0"),
    (np.zeros((0, 3072), dtype=np.uint8), [], r"data shape \(0, 3072\)"),
    (np.zeros((2, 100), dtype=np.uint8), [0, 1], r"data shape \(2, 100\)"),
])
def test_cifar_reader_checks_dtype_range_shape(tmp_path: Path, data: np.ndarray, labels: list,
                                               match: str) -> None:
    p = _cifar(tmp_path / "data_batch_1", data, labels)
    with pytest.raises(DataFormatError, match=rf"data_batch_1: {match}"):
        read_cifar_batch(p)


def test_cifar_reader_accepts_integral_float_labels(tmp_path: Path) -> None:
    p = _cifar(tmp_path / "b", np.zeros((2, 3072), dtype=np.int64) + 7, np.array([1.0, 2.0]))
    x, y = read_cifar_batch(p)
    assert x.dtype == np.uint8 and int(x.max()) == 7 and y.tolist() == [1, 2]


def _idx(path: Path, arr: np.ndarray, dims: tuple[int, ...] | None = None) -> Path:
    dims = arr.shape if dims is None else dims
    head = bytes([0, 0, 0x08, len(dims)]) + b"".join(struct.pack(">I", d) for d in dims)
    path.write_bytes(head + arr.astype(np.uint8).tobytes())
    return path


def test_idx_readers_check_shapes_and_name_the_file(tmp_path: Path) -> None:
    x8 = _idx(tmp_path / "train-images-idx3-ubyte", np.zeros((3, 8, 8)))
    y = _idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(3))
    with pytest.raises(DataFormatError, match=r"train-images-idx3-ubyte: images of 8 x 8 pixels"):
        read_idx_pair(x8, y, image_shape=(28, 28))
    huge = _idx(tmp_path / "huge", np.zeros(4), dims=(2**32 - 1,) * 4)
    with pytest.raises(DataFormatError, match=r"huge: IDX header says shape"):
        read_idx(huge)
    x0 = _idx(tmp_path / "empty-images", np.zeros((0, 28, 28)))
    y0 = _idx(tmp_path / "empty-labels", np.zeros(0))
    with pytest.raises(DataFormatError, match=r"empty-images: holds no images"):
        read_idx_pair(x0, y0)


def test_mnist_loader_refuses_8x8_images(tmp_path: Path) -> None:
    from blip.classification.data import load_benchmark

    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix in ("train", "t10k"):
        _idx(raw / f"{prefix}-images-idx3-ubyte", np.zeros((10, 8, 8)))
        _idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(10))
    with pytest.raises(DataFormatError, match=r"images-idx3-ubyte: images of 8 x 8 pixels"):
        load_benchmark("mnist5", tmp_path)
