"""blip.distributed: the collectives at world size 1 (identity) and on 2 gloo ranks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _spawn import run_ranks
from torch import Tensor, nn

from blip import distributed as D
from blip import fisher
from blip.models import MLP, AlexNet
from blip.strategy import BLIP

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
    long = torch.randn(3000)  # three rows of the checksum's grid, the last padded
    for i, j in ((5, 9), (5, 5 + 1024), (2999, 0)):  # same row; same column; far apart
        swapped = long.clone()
        swapped[i], swapped[j] = long[j].item(), long[i].item()
        assert not torch.equal(D.checksum(long), D.checksum(swapped)), (i, j)
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
    try:
        D.all_gather_rows(torch.zeros(1, 2 + rank))
        out["gather_mismatch"] = ""
    except ValueError as e:
        out["gather_mismatch"] = str(e)
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
        assert "all_gather_rows: the ranks' tensors differ" in r["gather_mismatch"]


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


# -- the Fisher on two ranks equals the single-process Fisher (issue 15, 6(b) and 6(d)) ------


def _models() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    mlp = MLP(10, hidden=12, classes_per_task=(4, 3))
    conv = AlexNet(in_shape=(3, 16, 16), classes_per_task=(5,), width=0.0625, fc1_width=16,
                   fc2_width=16)
    return mlp, conv


def _fisher_case() -> dict:
    """Both Fisher entry points on fixed models and data: 15 samples in batches of 7 (7, 7, 1:
    uneven shares and, in the last batch, an empty one on rank 1), a conv net in batches of
    5. Run in one process and on each rank; returns the estimates and the sampled targets."""
    mlp, conv = _models()
    x_mlp = torch.randn(15, 10, generator=torch.Generator().manual_seed(1))
    x_conv = torch.randn(13, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    drawn: list[Tensor] = []
    sizes: list[int] = []  # rows each true_fisher forward saw
    real = fisher._sample_targets

    def recording(logits: Tensor, generator: torch.Generator | None) -> Tensor:
        drawn.append(real(logits, generator))
        return drawn[-1]

    def head0(x: Tensor) -> Tensor:
        sizes.append(x.shape[0])
        return conv(x, 0)

    fisher._sample_targets = recording
    try:
        strategy = BLIP(mlp, F_prior=1e-12, n_batches=3, batch_size=7)
        strategy.end_task(1, (x_mlp, torch.zeros(15)), generator=torch.Generator().manual_seed(3))
        strategy.end_task(0, x_mlp[:9], generator=torch.Generator().manual_seed(4))
        layers = list(BLIP(conv, F_prior=1e-12).layers.values())  # converts conv's trunk
        fisher.estimate_fisher_(conv, layers, x_conv, lambda x: conv(x, 0), n_batches=3,
                                batch_size=5, generator=torch.Generator().manual_seed(6))
        accumulated = {f"{i}.{k}": getattr(lay, f"fisher_{k}").clone()
                       for i, lay in enumerate(layers) for k in lay.blip_param_names()}
        true, n = fisher.true_fisher(
            conv, [(k, m) for k, m in conv.named_modules() if isinstance(m, (nn.Linear,
                                                                              nn.Conv2d))],
            x_conv, head0, n_batches=3, batch_size=5,
            generator=torch.Generator().manual_seed(5))
    finally:
        fisher._sample_targets = real
    out = {"blip_state": {k: v.clone() for k, v in mlp.state_dict().items()}, "true": true,
           "n": n, "targets": drawn, "accumulated": accumulated,
           "forwarded": sizes}
    # 6(d): the end-of-task state is identical on every rank, and one flipped bit is caught
    D.check_identical(mlp.state_dict(), "model after task 1")
    if D.world()[0] == 1:
        mlp.trunk[0].bits_weight.view(-1)[17] ^= 1
    try:
        D.check_identical(mlp.state_dict(), "model after task 1")
        out["corrupted"] = ""
    except D.StateMismatchError as e:
        out["corrupted"] = str(e)
    return out


def fisher_close(got: Tensor, want: Tensor, name: str) -> None:
    """rtol 1e-5 per element, and an absolute floor of 1e-6 of the tensor's largest entry:
    the ranks forward shards, whose GEMMs round differently from the whole batch's, and an
    entry 1e-9 of its tensor's scale comes from a per-sample gradient that cancels (measured:
    1.7e-5 relative on an entry of 1e-12 in a tensor whose largest is 9e-3; 1e-7 norm-wise)."""
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * float(want.abs().max()),
                               msg=name)


def _both() -> dict:
    return {"collectives": _collectives(), "fisher": _fisher_case()}


@pytest.fixture(scope="module")
def spawned(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """One spawn for the whole module (each child imports torch afresh)."""
    return run_ranks(_both, Path(tmp_path_factory.mktemp("dist")))


@pytest.fixture(scope="module")
def ranks(spawned: list[dict]) -> list[dict]:
    return [r["collectives"] for r in spawned]


@pytest.fixture(scope="module")
def fisher_ranks(spawned: list[dict]) -> list[dict]:
    return [r["fisher"] for r in spawned]


@pytest.fixture(scope="module")
def fisher_single() -> dict:
    return _fisher_case()


def test_fisher_targets_are_the_single_process_draws(fisher_ranks: list[dict],
                                                    fisher_single: dict) -> None:
    assert len(fisher_single["targets"]) == 3 + 2 + 3 + 3  # 7+7+1, 7+2, 5+5+3 twice
    for r in fisher_ranks:
        assert len(r["targets"]) == len(fisher_single["targets"])
        for got, want in zip(r["targets"], fisher_single["targets"], strict=True):
            assert torch.equal(got, want)


def test_estimate_fisher_sharded_matches_one_process(fisher_ranks: list[dict],
                                                     fisher_single: dict) -> None:
    """BLIP's per-layer accumulators (a quantized conv net), before the bit update."""
    want = fisher_single["accumulated"]
    assert len(want) == 2 * 5 and all(bool(v.any()) for v in want.values())
    for r in fisher_ranks:
        assert sorted(r["accumulated"]) == sorted(want)
        for k in want:
            fisher_close(r["accumulated"][k], want[k], k)


def test_blip_state_after_sharded_fisher_matches_one_process(fisher_ranks: list[dict],
                                                             fisher_single: dict) -> None:
    """bits / prev / fisher_old after two end_task calls. The running Fisher agrees to rtol
    1e-5; the two ranks' states are bitwise equal (the all-reduce hands both the same sums).
    Against one process a bit may differ by one where a Fisher ratio sits within the fp32
    rounding of the summation order (a rank sums its rows, then the ranks' sums are added)
    of a power-of-two threshold; that weight's prev then differs by that one bit's step."""
    want = fisher_single["blip_state"]
    for k in want:
        assert torch.equal(fisher_ranks[0]["blip_state"][k], fisher_ranks[1]["blip_state"][k]), k
    got = fisher_ranks[0]["blip_state"]
    assert sorted(got) == sorted(want)
    assert any(".fisher_old_" in k for k in want) and any(".bits_" in k for k in want)
    for k in want:
        if ".fisher_old_" in k:
            fisher_close(got[k], want[k], k)
        elif ".bits_" in k:
            diff = (got[k].int() - want[k].int()).abs()
            assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) <= 0.02, k
            same = diff == 0
            prev = k.replace(".bits_", ".prev_")
            assert torch.equal(got[prev][same], want[prev][same]), prev
        elif ".prev_" not in k:
            assert torch.equal(got[k], want[k]), k


def test_true_fisher_sharded_matches_one_process(fisher_ranks: list[dict],
                                                 fisher_single: dict) -> None:
    # each rank forwarded its share of the batches of 5, 5, 3 only
    assert fisher_single["forwarded"] == [5, 5, 3]
    assert [r["forwarded"] for r in fisher_ranks] == [[3, 3, 2], [2, 2, 1]]
    want = fisher_single["true"]
    assert any(v.dim() == 4 for v in want.values())  # conv layers covered
    for r in fisher_ranks:
        assert r["n"] == fisher_single["n"] == 13
        assert sorted(r["true"]) == sorted(want)
        for k in want:
            fisher_close(r["true"][k], want[k], k)
        assert all(bool(v.any()) for k, v in want.items() if not k.startswith("heads"))


def test_corrupted_bit_on_rank_1_is_caught_naming_the_layer(fisher_ranks: list[dict],
                                                           fisher_single: dict) -> None:
    assert fisher_single["corrupted"] == ""  # one process: nothing to compare
    for r in fisher_ranks:
        assert "model after task 1" in r["corrupted"]
        assert "'trunk.0.bits_weight'" in r["corrupted"] and "ranks [1]" in r["corrupted"]
