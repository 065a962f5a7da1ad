"""Opt-in bit-allocation rules: how many bits a task's information gain freezes.

The authors' rule (docs/semantics.md, sections 2-3; the fused ``update_bits_`` kernel) is

    gain = 0.5 / ln 2 * ln((F + F_old (t+1)) / (F_old (t+2)))
    bits = min(bits + max(ceil(gain), 0), max_bit)

with ``F_old`` seeded by ``F_prior * fan_in``. :class:`Allocation` names the variants of
this rule that the study of ``benchmarks/blip_study.py`` (docs/blip-study.md) tried;
each field at its default is the authors' rule, and a BLIP whose allocation is the
default runs the kernel itself, so the default method stays bit-identical.

- ``gain_scale`` (s): ``ceil(s * gain)``. Every weight's gain shrinks in proportion, so
  the most informative weights, which the authors' rule pins almost solid after one task
  (8-12 of 20 bits on mnist5k-perm), keep more free bits for later tasks, while weights
  of small gain still get their bit. A constant F_prior cannot do this: it shifts every
  gain by the same number of bits.
- ``rounding``: ``ceil`` (the authors'), ``round`` or ``floor``. ``ceil`` gives a bit to
  every weight whose Fisher merely exceeds its running average (gain in (0, 1)), task
  after task; ``round``/``floor`` give it only from half / one bit of gain on.
- ``max_bits_per_task`` (k): no task freezes more than k bits of a weight, a capacity
  schedule that reserves the rest for later tasks (which may still freeze them).
- ``prior_bits`` (b): a data-driven prior in place of the global F_prior. After the
  first task, each parameter tensor's ``F_old`` is seeded from that task's own Fisher:
  ``median(F) / 4**b``, so its median weight gains about ``b - 0.5`` bits, whatever the
  scale of the Fisher (batch size, loss, layer width), per layer. It replaces
  ``F_prior * fan_in`` before the first task's bits are computed; F_prior then has no
  effect.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from blip_kernels.reference import GAIN_SCALE

from . import validate

ROUNDINGS = ("ceil", "round", "floor")


@dataclass(frozen=True)
class Allocation:
    """One bit-allocation rule; the defaults are the authors' (see the module doc)."""

    gain_scale: float = 1.0
    rounding: str = "ceil"
    max_bits_per_task: int | None = None
    prior_bits: float | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.gain_scale, int | float) and not isinstance(self.gain_scale, bool)
                and math.isfinite(self.gain_scale) and self.gain_scale > 0):
            raise ValueError(f"gain_scale must be a finite number > 0; got {self.gain_scale!r}")
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"rounding must be one of {ROUNDINGS}; got {self.rounding!r}")
        k = self.max_bits_per_task
        if k is not None and not (validate.is_int(k) and k >= 1):
            raise ValueError(f"max_bits_per_task must be None or an int >= 1; got {k!r}")
        b = self.prior_bits
        if b is not None and not (isinstance(b, int | float) and not isinstance(b, bool)
                                  and math.isfinite(b) and 0 <= b <= 32):
            raise ValueError(f"prior_bits must be None or a number in [0, 32]; got {b!r}")

    @property
    def is_authors(self) -> bool:
        return self == Allocation()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def calibrated_prior(fisher: Tensor, prior_bits: float) -> Tensor:
    """``F_old`` seeded from a task's Fisher: its median over the tensor / 4**prior_bits
    (the median of the positive entries where it is 0; the float32 tiny at worst)."""
    f = fisher.float().flatten()
    med = f.median()
    if not med > 0:
        pos = f[f > 0]
        med = pos.median() if pos.numel() else torch.tensor(0.0)
    value = max(float(med) / 4.0**prior_bits, torch.finfo(torch.float32).tiny)
    return torch.full_like(fisher, value, dtype=torch.float32)


def update_bits_(bits: Tensor, fisher: Tensor, fisher_old: Tensor, task: int, max_bit: int,
                 rule: Allocation) -> None:
    """Sections 2-3 under ``rule``: grow ``bits``, fold ``fisher`` into ``fisher_old``, zero
    ``fisher`` (in place, as the kernel). At ``Allocation()`` it computes what the kernel
    does (tests/core/test_allocation.py checks it exactly)."""
    if rule.prior_bits is not None and task == 0:
        fisher_old.copy_(calibrated_prior(fisher, rule.prior_bits))
    f, fo = fisher.float(), fisher_old.float()
    # 0-d fp32 tensors, as the reference: a true fp32 division, not a reciprocal
    t1, t2, c = (torch.tensor(v, dtype=torch.float32, device=f.device)
                 for v in (float(task + 1), float(task + 2), GAIN_SCALE))
    gain = c * torch.log((f + fo * t1) / (fo * t2))
    if rule.gain_scale != 1.0:
        gain = gain * rule.gain_scale
    grow = {"ceil": torch.ceil, "round": torch.round, "floor": torch.floor}[rule.rounding](gain)
    # NaN gain (0/0) grows nothing; +inf grows to the cap (compared before the int cast)
    cap = float(max_bit if rule.max_bits_per_task is None
                else min(max_bit, rule.max_bits_per_task))
    grow = torch.where(grow > 0, grow, torch.zeros_like(grow)).clamp(max=cap)
    bits.copy_((bits.to(torch.int32) + grow.to(torch.int32)).clamp(max=max_bit).to(bits.dtype))
    fisher_old.copy_((fo * t1 + f) / t2)
    fisher.zero_()


__all__ = ["ROUNDINGS", "Allocation", "calibrated_prior", "update_bits_"]
