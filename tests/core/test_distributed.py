"""blip.distributed: the collectives at world size 1 (identity) and on 2 gloo ranks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _spawn import run_ranks

from blip import distributed as D

# -- world size 1: everything is the identity ----------------------------------------------


def test_world_one_is_identity() -> None:
    assert D.world() == (0, 1) and not D.is_distributed()
    assert D.rows(7) == slice(0, 7)
    a = torch.arange(5.0)
    D.all_reduce_sum_([a])
    D.broadcast_([a])
    assert torch.equal(a, torch.arange(5.0))
    assert D.all_gather_rows(a) is a
    D.check_identical({"a": a}, "model")
    before = torch.get_rng_state()
    D.sync_rng_state()
    assert torch.equal(torch.get_rng_state(), before)


def test_bad_arguments_name_them() -> None:
    with pytest.raises(ValueError, match="rows: n"):
        D.rows(-1)
    with pytest.raises(ValueError, match="rows: n"):
        D.rows(True)
    with pytest.raises(TypeError, match="all_reduce_sum_: tensors must be a sequence"):
        D.all_reduce_sum_(torch.zeros(2))
    with pytest.raises(TypeError, match=r"tensors\[1\] must be a Tensor"):
        D.all_reduce_sum_([torch.zeros(2), 3])
    with pytest.raises(TypeError, match="bool"):
        D.all_reduce_sum_([torch.zeros(2, dtype=torch.bool)])
    with pytest.raises(ValueError, match="broadcast_: src"):
        D.broadcast_([torch.zeros(2)], src=1)
    with pytest.raises(TypeError, match="all_gather_rows"):
        D.all_gather_rows(torch.tensor(1.0))
    with pytest.raises(TypeError, match="'w' is a int"):
        D.check_identical({"w": 3}, "model")  # type: ignore[dict-item]


@pytest.mark.parametrize("n", [0, 1, 5, 6, 7])
@pytest.mark.parametrize("world", [2, 3])
def test_rows_split_as_tensor_split(monkeypatch: pytest.MonkeyPatch, n: int, world: int) -> None:
    expected = torch.arange(n).tensor_split(world)
    for rank in range(world):
        monkeypatch.setattr(D, "world", lambda r=rank: (r, world))
        assert torch.equal(torch.arange(n)[D.rows(n)], expected[rank])


def test_checksum_sees_one_bit_and_a_swap() -> None:
    w = torch.randn(33, 7)
    flipped = w.clone()
    flipped.view(torch.int32)[5, 3] ^= 1  # the last mantissa bit of one element
    swapped = w.clone()
    swapped[0, 0], swapped[0, 1] = w[0, 1].item(), w[0, 0].item()
    assert not torch.equal(D.checksum(w), D.checksum(flipped))
    assert not torch.equal(D.checksum(w), D.checksum(swapped))
    bits = torch.randint(0, 20, (13,), dtype=torch.uint8)  # 13 bytes: uint8 words
    assert torch.equal(D.checksum(bits), D.checksum(bits.clone()))
    bits2 = bits.clone()
    bits2[12] ^= 4
    assert not torch.equal(D.checksum(bits), D.checksum(bits2))


# -- two gloo ranks ------------------------------------------------------------------------


def _collectives() -> dict:
    rank, world = D.world()
    out: dict = {"world": [rank, world], "rows": [D.rows(7).start, D.rows(7).stop]}
    f32 = torch.full((2, 3), float(rank + 1))
    f64 = torch.tensor([0.5 * (rank + 1)], dtype=torch.float64)
    i64 = torch.tensor([rank, 10 * rank], dtype=torch.int64)
    f32b = torch.ones(4) * (rank + 1)
    D.all_reduce_sum_([f32, i64, f64, f32b])
    out["sum"] = [f32, f64, i64, f32b]
    # uneven rows: rank 0 holds 3 rows, rank 1 holds 1
    local = torch.arange(12.0).view(6, 2)[slice(0, 3) if rank == 0 else slice(3, 4)]
    out["gathered"] = D.all_gather_rows(local)
    empty = torch.zeros(0, 2) if rank == 0 else torch.ones(2, 2)
    out["gathered_empty"] = D.all_gather_rows(empty)
    b = torch.full((3,), float(rank))
    D.broadcast_([b], src=1)
    out["broadcast"] = b

    state = {"trunk.0.weight": torch.arange(6.0).view(2, 3),
             "trunk.0.bits_weight": torch.full((2, 3), 3, dtype=torch.uint8)}
    D.check_identical(state, "model")  # identical: passes
    out["identical_passed"] = True
    if rank == 1:
        state["trunk.0.bits_weight"][1, 2] ^= 1
    try:
        D.check_identical(state, "model after task 0")
        out["mismatch"] = ""
    except D.StateMismatchError as e:
        out["mismatch"] = str(e)
    extra = dict(state) if rank == 0 else {**state, "more": torch.zeros(1)}
    try:
        D.check_identical(extra, "model")
        out["layout"] = ""
    except D.StateMismatchError as e:
        out["layout"] = str(e)

    torch.manual_seed(100 + rank)
    D.sync_rng_state(src=0)
    out["draw"] = torch.rand(4)
    return out


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    return run_ranks(_collectives, Path(tmp_path_factory.mktemp("dist")))


def test_world_and_rows_on_two_ranks(ranks: list[dict]) -> None:
    assert [r["world"] for r in ranks] == [[0, 2], [1, 2]]
    assert [r["rows"] for r in ranks] == [[0, 4], [4, 7]]


def test_all_reduce_sum_per_dtype(ranks: list[dict]) -> None:
    for r in ranks:
        f32, f64, i64, f32b = r["sum"]
        assert torch.equal(f32, torch.full((2, 3), 3.0))
        assert torch.equal(f64, torch.tensor([1.5], dtype=torch.float64))
        assert torch.equal(i64, torch.tensor([1, 10]))
        assert torch.equal(f32b, torch.full((4,), 3.0))


def test_all_gather_rows_uneven(ranks: list[dict]) -> None:
    for r in ranks:
        assert torch.equal(r["gathered"], torch.arange(8.0).view(4, 2))
        assert torch.equal(r["gathered_empty"], torch.ones(2, 2))


def test_broadcast_from_src(ranks: list[dict]) -> None:
    for r in ranks:
        assert torch.equal(r["broadcast"], torch.ones(3))


def test_check_identical_names_the_differing_tensor(ranks: list[dict]) -> None:
    for r in ranks:  # every rank raises (no rank is left waiting in a collective)
        assert r["identical_passed"]
        assert "model after task 0" in r["mismatch"]
        assert "'trunk.0.bits_weight'" in r["mismatch"] and "ranks [1]" in r["mismatch"]
        assert "trunk.0.weight'" not in r["mismatch"]
        assert "different tensors" in r["layout"] and "ranks [1]" in r["layout"]


def test_sync_rng_state(ranks: list[dict]) -> None:
    assert torch.equal(ranks[0]["draw"], ranks[1]["draw"])
    torch.manual_seed(100)
    assert torch.equal(ranks[0]["draw"], torch.rand(4))
