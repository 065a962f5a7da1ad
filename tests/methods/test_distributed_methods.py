"""Every method under 2 gloo ranks (DDP, the issue-15 contract) against one process.

The loop below is the contract the trainer follows (blip/methods/README.md, "Distributed"):
every rank sees the same global batches and trains on its ``rows`` of each, through a
``DistributedDataParallel(broadcast_buffers=False)``, its loss scaled by share x world /
batch; at the task end the RNG is synced, ``after_task`` runs on every rank on the same
sample, and the state is checksummed. One spawn trains all 12 methods on a tiny MLP."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _spawn import run_ranks
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from blip import distributed as D
from blip.methods import METHODS, make_method
from blip.methods.base import check_distributed
from blip.methods.hat import agreed_links
from blip.methods.importance import batch_gradient_importance
from blip.models import MLP

TASKS, STEPS, BATCH, SAMPLE = 2, 3, 7, 23
#: case -> (method, hparams): small budgets so that all train in seconds. The reference
#: importances batch the sample by the run's batch size (7: 4 batches, 2 per rank); BLIP's
#: true Fisher has a short last batch (9, 9, 5)
FISHER = {"fisher_batches": 3, "fisher_batch_size": 9}
CASES: dict[str, tuple[str, dict]] = {
    "agem": ("agem", {"mem_per_task": 11, "ref_batch_size": 9}),
    "blip": ("blip", {**FISHER, "F_prior": 1e-12}),
    "ewc": ("ewc", {"seed": 0}),
    "ewc/blip-fisher": ("ewc", {**FISHER, "fisher": "blip", "seed": 0}),
    "ewc/sum": ("ewc", {"accumulate": "sum", "seed": 0}),
    "finetune": ("finetune", {}),
    "freeze": ("freeze", {}),
    "hat": ("hat", {"batches_per_epoch": STEPS}),
    "imm-mode": ("imm-mode", {"seed": 0}),
    "imm-mode/blip-fisher": ("imm-mode", {**FISHER, "fisher": "blip", "seed": 0}),
    "lwf": ("lwf", {}),
    "mas": ("mas", {}),
    "mas/per-sample": ("mas", {"importance": "per-sample", "chunk": 5}),
    "online-ewc": ("online-ewc", {"seed": 0}),
    "online-ewc/blip-fisher": ("online-ewc", {**FISHER, "fisher": "blip", "seed": 0}),
    "packnet": ("packnet", {"retrain_epochs": 1, "retrain_batch_size": 8, "seed": 0}),
    "si": ("si", {}),
}


def _data() -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(7)
    return [(torch.randn(SAMPLE, 8, generator=g), torch.randint(0, 3, (SAMPLE,), generator=g))
            for _ in range(TASKS)]


def _run(case: str) -> dict:
    """Train ``case`` for TASKS tasks as the trainer would; returns its end-of-task state."""
    world = D.world()[1]
    name, hparams = CASES[case]
    torch.manual_seed(0)
    model = MLP(8, hidden=10, classes_per_task=(3,) * TASKS)
    method = make_method(name, model, **hparams)
    net = method.prepare()
    for task, (x, y) in enumerate(_data()):
        torch.manual_seed(100 + task)  # the trainer re-seeds the global RNG per task
        method.before_task(task)
        opt = method.make_optimizer(task, 0.05)
        train = (DistributedDataParallel(net, broadcast_buffers=False,
                                         static_graph=True)
                 if world > 1 else net)
        method.before_epoch(task, 0)
        for step in range(STEPS):
            xb, yb = x[step * BATCH:(step + 1) * BATCH], y[step * BATCH:(step + 1) * BATCH]
            share = D.rows(len(xb))
            n = share.stop - share.start
            loss = method.training_loss(train, xb[share], yb[share], task) * (n * world / len(xb))
            opt.zero_grad()
            loss.backward()
            method.after_backward(task)
            opt.step()
            method.after_step(task)
        del train
        D.sync_rng_state()
        method.after_task(task, x, y)
        D.check_identical(net.state_dict(), f"{case}: model after task {task}")
        D.check_identical(method.distributed_state(), f"{case}: method state after task {task}")
    return {"model": {k: v.detach().clone() for k, v in net.state_dict().items()},
            "method": {k: v.detach().clone() for k, v in method.distributed_state().items()}}


def _agem_reference() -> dict:
    """A-GEM's g_ref when the ranks' global RNGs differ (as they do once dropout has run on
    shards of different sizes): every rank must still project onto rank 0's g_ref."""
    rank = D.world()[0]
    torch.manual_seed(0)
    model = MLP(8, hidden=10, classes_per_task=(3,) * TASKS)
    method = make_method("agem", model, mem_per_task=11, ref_batch_size=9)
    method.prepare()
    torch.manual_seed(5)
    method.after_task(0, *_data()[0])
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    torch.manual_seed(1000 + rank)
    method.after_backward(1)
    return {f"{i}": g.clone() for i, g in enumerate(method.ref_grad) if g is not None}


def _importance_shards() -> dict:
    """The reference estimators' loop on its own: 5 batches of 5 (the last of 3) over 23
    samples, in a shuffled order; which batches this rank ran, and the estimate."""
    torch.manual_seed(0)
    model = MLP(8, hidden=10, classes_per_task=(3,) * TASKS)
    x, y = _data()[0]
    seen: list[int] = []

    def loss(xb: Tensor, yb: Tensor) -> Tensor:
        seen.append(xb.shape[0])
        return F.cross_entropy(model(xb, 0), yb)

    order = torch.randperm(SAMPLE, generator=torch.Generator().manual_seed(3))
    est, n = batch_gradient_importance(model, loss, x, y, batch_size=5, power=2, scale=2.0,
                                       training=True, order=order)
    return {"batches": seen, "n": n, "estimate": est}


def _all_methods() -> dict:
    out = {"agem_reference": _agem_reference(), "importance": _importance_shards(),
           "hat_links": agreed_links([None, 0, 1] if D.world()[0] == 0 else [None, 0, None])}
    for case in CASES:
        try:
            out[case] = _run(case)
        except Exception as e:  # noqa: BLE001 - reported per case by the tests below
            out[case] = {"error": f"{type(e).__name__}: {e}"}
    return out


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    return run_ranks(_all_methods, Path(tmp_path_factory.mktemp("methods")))


def test_every_method_declares_its_distributed_safety() -> None:
    for name, cls in METHODS.items():
        assert "DISTRIBUTED" in vars(cls), f"{name} must declare DISTRIBUTED (None or a reason)"
        assert cls.DISTRIBUTED is None or (isinstance(cls.DISTRIBUTED, str) and cls.DISTRIBUTED)


def test_a_refusal_names_the_method_and_the_reason() -> None:
    class Refuses(METHODS["finetune"]):  # type: ignore[misc,valid-type]
        name = "per-process-memory"
        DISTRIBUTED = "its replay buffer is filled per process"

    check_distributed(Refuses, 1)  # one process: always fine
    with pytest.raises(ValueError, match=r"method 'per-process-memory' cannot train on 2 "
                                         r"ranks .*replay buffer is filled per process"):
        check_distributed(Refuses, 2)
    for cls in METHODS.values():
        check_distributed(cls, 2)  # all 12 are safe


@pytest.mark.parametrize("case", list(CASES))
def test_method_on_two_ranks_matches_one_process(ranks: list[dict], case: str) -> None:
    """Both ranks end bitwise identical (checked in the children too, by check_identical);
    against one process, weights and the method's state (Fisher, importances, masks,
    memory...) agree to rtol 1e-5 (gradients are reduced in another order, and each rank
    forwards a shard). BLIP's bits may differ by one where a Fisher ratio sits on a
    threshold; their fraction is bounded instead."""
    assert {m for m, _ in CASES.values()} == set(METHODS)  # every method is covered
    for r in ranks:
        assert "error" not in r[case], r[case].get("error")
    want = _run(case)
    a, b = ranks[0][case], ranks[1][case]
    for part in ("model", "method"):
        assert sorted(a[part]) == sorted(b[part]) == sorted(want[part])
        for k in want[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
            got, ref = a[part][k], want[part][k]
            if ".bits_" in k:
                diff = (got.int() - ref.int()).abs()
                assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) <= 0.02, k
            elif got.is_floating_point():
                same = torch.ones_like(got, dtype=torch.bool)
                if ".prev_" in k:  # a weight whose bit count differs has another prev
                    bits = k.replace(".prev_", ".bits_")
                    same = a[part][bits] == want[part][bits]
                torch.testing.assert_close(got[same], ref[same], rtol=1e-5,
                                           atol=1e-6 * float(ref.abs().max()), msg=k)
            else:
                assert torch.equal(got, ref), (part, k)


def test_agem_projects_onto_rank_0s_reference_gradient(ranks: list[dict]) -> None:
    want = _agem_reference()  # one process, seeded as rank 0
    # Avalanche's convention projects every trainable parameter: the memory loss reaches
    # the trunk and task 0's head; the other heads' g_ref is None in one process, and
    # zeros on several ranks (a rank cannot tell an unused parameter from an empty share)
    assert len(want) == 4
    for r in ranks:
        assert set(want) <= set(r["agem_reference"])
        for k, g in r["agem_reference"].items():
            if k not in want:
                assert not g.any(), k
        for k in want:
            torch.testing.assert_close(r["agem_reference"][k], want[k], rtol=1e-5,
                                       atol=1e-6 * float(want[k].abs().max()), msg=k)


def test_hat_keeps_an_input_mask_link_only_where_every_rank_probed_it(
        ranks: list[dict]) -> None:
    assert agreed_links([None, 0, 1]) == [None, 0, 1]  # one process: as probed
    assert [r["hat_links"] for r in ranks] == [[None, 0, None]] * 2


def test_reference_importance_shards_whole_batches(ranks: list[dict]) -> None:
    want = _importance_shards()
    assert want["batches"] == [5, 5, 5, 5, 3] and want["n"] == 5
    assert [r["importance"]["batches"] for r in ranks] == [[5, 5, 5], [5, 3]]
    for r in ranks:
        assert r["importance"]["n"] == 5
        for k, v in want["estimate"].items():
            torch.testing.assert_close(r["importance"]["estimate"][k], v, rtol=1e-5,
                                       atol=1e-6 * float(v.abs().max()), msg=k)
