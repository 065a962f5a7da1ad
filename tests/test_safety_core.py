"""Memory safety of the optimizer, atomic state loads, data readers that check what
they read (issue 11 findings 3, 6, 12)."""

from __future__ import annotations

import pickle
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import blip
from blip.data import DataFormatError
from blip.data.formats import read_cifar_batch, read_idx, read_idx_pair
from blip.methods import make_method
from blip.models import MLP
from blip.optim import ConstrainedSGD

ROOT = Path(__file__).parent.parent


# -- ConstrainedSGD re-checks every step ----------------------------------------------------


def test_replaced_weight_data_is_a_clear_error_not_a_crash() -> None:
    # In a subprocess: before the fix this step wrote 16M floats past 4x4 buffers (SIGSEGV).
    script = textwrap.dedent("""
        import torch, blip
        from blip.optim import ConstrainedSGD
        model = blip.convert(torch.nn.Sequential(torch.nn.Linear(4, 4)))
        opt = ConstrainedSGD(model, 0.1, momentum=0.9)
        model(torch.randn(2, 4)).sum().backward()
        opt.step()
        layer = model[0]
        layer.weight.data = torch.zeros(4, 4_000_000)
        layer.weight.grad = torch.ones(4, 4_000_000)
        try:
            opt.step()
        except ValueError as e:
            print("ERROR:", e)
        else:
            print("NO ERROR")
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={"PYTHONPATH": str(ROOT), "PATH": ""})
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    assert "ERROR:" in proc.stdout and "'0.weight'" in proc.stdout, proc.stdout
    assert "(4, 4000000)" in proc.stdout and "(4, 4)" in proc.stdout


def test_swapped_buffers_are_rechecked() -> None:
    model = blip.convert(nn.Sequential(nn.Linear(3, 2)))
    opt = ConstrainedSGD(model, 0.1)
    model(torch.randn(2, 3)).sum().backward()
    opt.step()
    layer = model[0]
    layer.bits_weight = torch.zeros(5, dtype=torch.uint8)  # a wrong-sized buffer
    with pytest.raises(ValueError, match=r"parameter '0.weight'.*\(2, 3\).*\(5,\)"):
        opt.step()
    layer.bits_weight = torch.full((2, 3), 200, dtype=torch.uint8)  # right size, bad values
    with pytest.raises((ValueError, RuntimeError), match="max_bit|bits"):
        opt.step()


# -- atomic state loads --------------------------------------------------------------------


def test_rejected_layer_load_leaves_the_layer_unchanged() -> None:
    layer = blip.QuantLinear(4, 3)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    sd = {k: v.clone() for k, v in before.items()}
    sd["weight"] += 1.0
    sd["bits_weight"][0, 0] = 200  # > max_bit
    with pytest.raises(ValueError, match=r"bits_weight holds values 0..200"):
        layer.load_state_dict(sd)
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k]), k
    sd = {k: v.clone() for k, v in before.items()}
    sd["prev_weight"][1, 1] = float("nan")
    with pytest.raises(ValueError, match="prev_weight holds 1 values that are not finite"):
        layer.load_state_dict(sd)


def test_rejected_blip_state_leaves_the_whole_model_unchanged() -> None:
    net = MLP(4, 6, [2, 2], n_hidden_layers=2)
    method = make_method("blip", net)
    method.prepare()
    strategy = method.strategy
    before = {k: v.clone() for k, v in net.state_dict().items()}
    state = strategy.state_dict()
    bad = {k: v.clone() for k, v in state["model"].items()}
    first, last = "trunk.0.bits_weight", "trunk.2.bits_weight"
    bad[first][:] = 3  # valid, and loaded first ...
    bad[last] = torch.zeros(1, 1, dtype=torch.uint8)  # ... then a wrong shape
    with pytest.raises(RuntimeError, match="size mismatch"):
        strategy.load_state_dict({**state, "model": bad, "tasks_seen": 5})
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert strategy.tasks_seen == 0


def test_rejected_method_state_changes_nothing() -> None:
    net = MLP(4, 6, [2, 2])
    ewc = make_method("ewc", net)
    good = {n: torch.ones_like(p) for n, p in net.named_parameters()}
    ewc.load_state_dict({"fisher": good, "anchor": good, "tasks": 1})
    bad_anchor = {**good, "trunk.0.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match="anchor"):
        ewc.load_state_dict({"fisher": {n: 2 * v for n, v in good.items()}, "anchor": bad_anchor,
                             "tasks": 2})
    assert all(torch.equal(v, good[n]) for n, v in ewc.fisher.items()) and ewc.tasks == 1
    with pytest.raises(ValueError, match="non-finite"):
        ewc.load_state_dict({"fisher": {**good, "trunk.0.weight":
                                        torch.full_like(good["trunk.0.weight"], np.inf)},
                             "anchor": good, "tasks": 2})


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
    from blip.data import load_benchmark

    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix in ("train", "t10k"):
        _idx(raw / f"{prefix}-images-idx3-ubyte", np.zeros((10, 8, 8)))
        _idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(10))
    with pytest.raises(DataFormatError, match=r"images-idx3-ubyte: images of 8 x 8 pixels"):
        load_benchmark("mnist5", tmp_path)
