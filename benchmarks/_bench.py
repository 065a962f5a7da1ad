"""Helpers shared by the benchmark modules."""

from __future__ import annotations

import math

import torch

import blip_kernels

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def bench_backends(device: str) -> list[str]:
    """Backends worth timing: the Triton interpreter on CPU is a correctness tool only."""
    names = blip_kernels.available_backends(device)
    return [n for n in names if not (n == "triton" and device == "cpu")]


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def run(benchmark, fn, group: str, variant: str, nbytes: int | None = None,  # noqa: ANN001
        rounds: int = 20, **extra: float) -> None:
    """Time ``fn`` (synchronised) as ``variant`` of ``group``; extra_info feeds the ratio table."""
    benchmark.group = group
    benchmark.extra_info.update(variant=variant, **extra)
    if nbytes is not None:
        benchmark.extra_info["bytes"] = nbytes

    def timed() -> None:
        fn()
        sync()

    benchmark.pedantic(timed, rounds=rounds, warmup_rounds=2, iterations=1)


def copy_same_bytes(benchmark, group: str, nbytes: int) -> None:  # noqa: ANN001
    """A plain copy moving the same number of bytes (half read, half written)."""
    n = math.ceil(nbytes / 2 / 4)
    src, dst = torch.randn(n, device=DEVICE), torch.empty(n, device=DEVICE)
    run(benchmark, lambda: dst.copy_(src), group, "copy", 2 * n * 4)


