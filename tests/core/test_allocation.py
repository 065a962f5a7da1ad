"""blip.allocation: the opt-in bit-allocation rules. At its defaults the rule is the
authors' (the kernel's output exactly, the conformance vectors); each variant is checked
against its formula on hand-made gains."""

from __future__ import annotations

import math

import pytest
import torch

import blip_kernels
from blip.allocation import Allocation, calibrated_prior, update_bits_
from blip.methods import make_method
from blip.models import MLP

MAX_BIT = 20


def _run(rule: Allocation, bits, fisher, fisher_old, task: int):  # noqa: ANN001, ANN202
    b, f, fo = bits.clone(), fisher.clone(), fisher_old.clone()
    update_bits_(b, f, fo, task, MAX_BIT, rule)
    return b, f, fo


@pytest.mark.parametrize("task", [0, 1, 3])
def test_default_rule_is_the_conformance_vectors(vectors: dict, task: int) -> None:
    v = {k.removeprefix(f"bits_t{task}_"): x for k, x in vectors.items()
         if k.startswith(f"bits_t{task}_")}
    bits = v["before"].to(torch.uint8)
    b, f, fo = _run(Allocation(), bits, v["fisher"].float(), v["fisher_old"].float(), task)
    sure = ~v["ambiguous"].bool()
    assert torch.equal(b.long()[sure], v["after"].long()[sure])
    torch.testing.assert_close(fo, v["fisher_old_next"].float(), rtol=1e-6, atol=0)
    assert not f.any()


@pytest.mark.parametrize("task", [0, 2, 7])
def test_default_rule_equals_the_kernel_exactly(task: int) -> None:
    g = torch.Generator().manual_seed(task)
    shape = (37, 53)
    fisher = torch.rand(shape, generator=g) ** 6 * 1e-6
    fisher[0, :5] = 0.0  # 0/0 would be NaN if F_old were 0 too; here F_old > 0
    fisher_old = torch.rand(shape, generator=g) * 1e-9 + 1e-14
    bits = torch.randint(0, MAX_BIT + 1, shape, generator=g, dtype=torch.uint8)
    kb, kf, kfo = bits.clone(), fisher.clone(), fisher_old.clone()
    blip_kernels.update_bits_(kb, kf, kfo, task, MAX_BIT)
    b, f, fo = _run(Allocation(), bits, fisher, fisher_old, task)
    assert torch.equal(b, kb) and torch.equal(fo, kfo) and torch.equal(f, kf)


def _gain_inputs(gains: list[float]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """F and F_old at task 0 whose authors' gain is each of ``gains`` (F_old = 1)."""
    # gain = 0.5 log2((F + F_old) / (2 F_old))  =>  F = 2 * 4**gain - 1
    fisher = torch.tensor([2.0 * 4.0**g - 1.0 for g in gains], dtype=torch.float64).float()
    return torch.zeros(len(gains), dtype=torch.uint8), fisher, torch.ones(len(gains))


GAINS = [0.3, 0.7, 1.6, 2.2, 5.5]


@pytest.mark.parametrize(("rounding", "expect"), [("ceil", [1, 1, 2, 3, 6]),
                                                   ("round", [0, 1, 2, 2, 6]),
                                                   ("floor", [0, 0, 1, 2, 5])])
def test_rounding(rounding: str, expect: list[int]) -> None:
    b, _, _ = _run(Allocation(rounding=rounding), *_gain_inputs(GAINS), 0)
    assert b.tolist() == expect


@pytest.mark.parametrize("scale", [0.5, 0.6, 1.5])
def test_gain_scale_scales_every_gain(scale: float) -> None:
    b, _, _ = _run(Allocation(gain_scale=scale), *_gain_inputs(GAINS), 0)
    # away from integers (a gain within 1e-4 of one would be float-rounding's call)
    want = [math.ceil(scale * g) for g in GAINS]
    assert all(abs(scale * g - round(scale * g)) > 1e-4 for g in GAINS)
    assert b.tolist() == want


def test_max_bits_per_task_caps_one_task_not_the_total() -> None:
    bits, fisher, fisher_old = _gain_inputs(GAINS)
    bits += 17
    b, _, _ = _run(Allocation(max_bits_per_task=2), bits, fisher, fisher_old, 0)
    assert b.tolist() == [18, 18, 19, 19, 19]  # + min(ceil(gain), 2)
    b, _, _ = _run(Allocation(max_bits_per_task=2), bits + 2, fisher, fisher_old, 0)
    assert b.tolist() == [20, 20, 20, 20, 20]  # max_bit still caps the total


@pytest.mark.parametrize("prior_bits", [0.0, 3.0, 5.5])
def test_prior_bits_seed_f_old_from_the_first_task(prior_bits: float) -> None:
    g = torch.Generator().manual_seed(1)
    fisher = torch.rand(101, generator=g) * 1e-7 + 1e-9
    fisher_old = torch.full((101,), 123.0)  # the F_prior seed: replaced at task 0
    b, _, fo = _run(Allocation(prior_bits=prior_bits), torch.zeros(101, dtype=torch.uint8),
                    fisher, fisher_old, 0)
    seed = float(fisher.median()) / 4.0**prior_bits
    # the median weight gains 0.5 log2((4^b + 1) / 2)
    median_bits = b[fisher == fisher.median()].item()
    assert median_bits == math.ceil(0.5 * math.log2((4.0**prior_bits + 1) / 2))
    torch.testing.assert_close(fo, (seed + fisher) / 2, rtol=1e-6, atol=0)
    # from the second task on, F_old is the running average as usual: no reseeding
    b2, _, fo2 = _run(Allocation(prior_bits=prior_bits), b, fisher, fo, 1)
    torch.testing.assert_close(fo2, (2 * fo + fisher) / 3, rtol=1e-6, atol=0)


def test_calibrated_prior_of_a_mostly_zero_fisher() -> None:
    f = torch.zeros(10)
    f[-3:] = torch.tensor([4.0, 8.0, 16.0])
    assert torch.equal(calibrated_prior(f, 1.0), torch.full((10,), 2.0))  # median of > 0
    assert calibrated_prior(torch.zeros(4), 2.0).min() > 0  # never a zero divisor


@pytest.mark.parametrize(("kw", "name"), [({"gain_scale": 0}, "gain_scale"),
                                          ({"gain_scale": float("nan")}, "gain_scale"),
                                          ({"rounding": "up"}, "rounding"),
                                          ({"max_bits_per_task": 0}, "max_bits_per_task"),
                                          ({"max_bits_per_task": 2.5}, "max_bits_per_task"),
                                          ({"prior_bits": -1}, "prior_bits"),
                                          ({"prior_bits": True}, "prior_bits")])
def test_bad_settings_name_the_argument(kw: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        Allocation(**kw)
    with pytest.raises(ValueError, match=name):  # also through the method's hyper-parameters
        make_method("blip", MLP(4, 8, [2]), **kw)


def test_the_method_runs_the_kernel_only_for_the_authors_rule(
        monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = blip_kernels.update_bits_
    monkeypatch.setattr(blip_kernels, "update_bits_",
                        lambda *a: (calls.append(1), real(*a))[1])
    x = torch.randn(32, 4)
    y = torch.randint(0, 2, (32,))
    bits = {}
    for kw in ({}, {"gain_scale": 0.5}):
        torch.manual_seed(0)
        m = make_method("blip", MLP(4, 8, [2]), **kw)
        m.prepare()
        m.after_task(0, x, y)
        bits[bool(kw)] = m.model.trunk[0].bits_weight.clone()
        assert m.strategy.config()["allocation"]["gain_scale"] == kw.get("gain_scale", 1.0)
    assert len(calls) == 2  # weight and bias of the one layer, default method only
    assert (bits[True].int() <= bits[False].int()).all() and not torch.equal(*bits.values())
