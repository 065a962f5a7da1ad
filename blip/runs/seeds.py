"""Seeds derived from integers, the same in every process (no hash randomisation)."""

from __future__ import annotations

import random

import numpy as np
import torch


def derive_seed(*parts: int, bits: int = 63) -> int:
    """A ``bits``-wide seed from integers. 63 for torch generators; 31 for envs, which
    want seeds below 2**31 (a different draw: one 32-bit word instead of two)."""
    if not 1 <= bits <= 63:
        raise ValueError(f"bits must be in 1..63; got {bits!r}")
    seq = np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts])
    mask = (1 << bits) - 1
    if bits <= 32:
        return int(seq.generate_state(1)[0]) & mask
    h = seq.generate_state(2)
    return ((int(h[0]) << 31) ^ int(h[1])) & mask


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


__all__ = ["derive_seed", "seed_everything"]
