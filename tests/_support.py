"""Helpers shared by test modules (importable because pytest puts tests/ on sys.path)."""

from __future__ import annotations

import os

import torch

import blip_kernels

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def backend_device_pairs() -> list[tuple[str, str]]:
    """Every (backend, device) pair that can run here (``BLIP_TEST_BACKENDS=a,b`` narrows it)."""
    only = os.environ.get("BLIP_TEST_BACKENDS")
    names = only.split(",") if only else blip_kernels.backends.NAMES
    return [
        (b, d) for d in DEVICES for b in names if blip_kernels.unavailable_reason(b, d) is None
    ]
