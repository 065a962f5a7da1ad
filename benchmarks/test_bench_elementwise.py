"""The memory-bound ops on a 4M-element parameter: fused kernels vs the unfused composites.

The unfused step is what the authors' code runs after every batch: torch.optim.SGD's
step, then the clipping chain (diff, range, min, max, add, clamp) as separate ops.
"""

from __future__ import annotations

import math

import pytest
import torch
from _bench import DEVICE, bench_backends, copy_same_bytes, run

import blip_kernels as bk

N = 4 * 1024 * 1024
BOUND, MAX_BIT, LR = 0.05, 20, 0.01
# Bytes each op must move per element (fp32 param): read+write w, read grad, prev, bits,
# read+write the momentum buffer.
STEP_BYTES, PROJECT_BYTES, QUANTIZE_BYTES = 4 + 4 + 4 + 4 + 1 + 4 + 4, 4 + 4 + 4 + 1, 4 + 1 + 4


@pytest.fixture(scope="module")
def tensors():
    g = torch.Generator().manual_seed(0)
    bits = torch.randint(0, 12, (N,), generator=g).to(torch.uint8).to(DEVICE)
    prev = bk.quantize((torch.rand(N, generator=g) * 2 - 1).to(DEVICE) * BOUND, bits, BOUND)
    return {
        "w": prev.clone(), "prev": prev, "bits": bits,
        "grad": torch.randn(N, generator=g).to(DEVICE) * 1e-3,
        "buf": torch.zeros(N, device=DEVICE),
    }


def authors_clipping(w, prev, bits) -> None:  # noqa: ANN001
    diff = w - prev
    rng = BOUND * (0.5 ** bits.float())
    w.copy_(prev + torch.max(torch.min(diff, rng), -rng))
    lim = BOUND * (1.0 - 0.5**MAX_BIT)
    w.clamp_(-lim, lim)


# ------------------------------------------------------------------ step


def test_step_copy(benchmark):
    copy_same_bytes(benchmark, "step/4M", STEP_BYTES * N)


def test_step_unfused(benchmark, tensors):
    p = torch.nn.Parameter(tensors["w"].clone())
    p.grad = tensors["grad"]
    opt = torch.optim.SGD([p], lr=LR, momentum=0.9)

    def step() -> None:
        opt.step()
        with torch.no_grad():
            authors_clipping(p.data, tensors["prev"], tensors["bits"])

    run(benchmark, step, "step/4M", "unfused", STEP_BYTES * N)


@pytest.mark.parametrize("backend", bench_backends(DEVICE))
def test_step_fused(benchmark, tensors, backend):
    t = tensors

    def step() -> None:
        bk.constrained_sgd_step_(t["w"], t["grad"], t["prev"], t["bits"], BOUND, MAX_BIT, LR,
                                 t["buf"], momentum=0.9)

    with bk.use_backend(backend), bk.value_checks(False):
        run(benchmark, step, "step/4M", backend, STEP_BYTES * N)


# --------------------------------------------------------------- project


def test_project_copy(benchmark):
    copy_same_bytes(benchmark, "project/4M", PROJECT_BYTES * N)


def test_project_unfused(benchmark, tensors):
    w = tensors["w"].clone()
    run(benchmark, lambda: authors_clipping(w, tensors["prev"], tensors["bits"]),
         "project/4M", "unfused", PROJECT_BYTES * N)


@pytest.mark.parametrize("backend", bench_backends(DEVICE))
def test_project_fused(benchmark, tensors, backend):
    w = tensors["w"].clone()
    with bk.use_backend(backend), bk.value_checks(False):
        run(benchmark, lambda: bk.project_(w, tensors["prev"], tensors["bits"], BOUND, MAX_BIT),
             "project/4M", backend, PROJECT_BYTES * N)


# -------------------------------------------------------------- quantize


def authors_quantize(w, bits) -> torch.Tensor:  # noqa: ANN001
    x = w / BOUND
    n = (2**bits.long()).float()
    out = torch.round(x * n) / n
    out[bits == 0] = 0.0
    return out * BOUND


def test_quantize_copy(benchmark):
    copy_same_bytes(benchmark, "quantize/4M", QUANTIZE_BYTES * N)


def test_quantize_unfused(benchmark, tensors):
    run(benchmark, lambda: authors_quantize(tensors["w"], tensors["bits"]),
         "quantize/4M", "unfused", QUANTIZE_BYTES * N)


@pytest.mark.parametrize("backend", bench_backends(DEVICE))
def test_quantize_fused(benchmark, tensors, backend):
    with bk.use_backend(backend):
        run(benchmark, lambda: bk.quantize_ste(tensors["w"], tensors["bits"], BOUND),
             "quantize/4M", backend, QUANTIZE_BYTES * N)


# ---------------------------------------------------- bit allocation and sync

BITS_BYTES = 1 + 1 + 4 + 4 + 4 + 4  # bits r/w, fisher r/w (zeroed), fisher_old r/w
SYNC_BYTES = 4 + 1 + 4 + 4  # w r/w, bits, prev written


@pytest.fixture(scope="module")
def fisher_state():
    g = torch.Generator().manual_seed(1)
    return {
        "bits": torch.randint(0, 12, (N,), generator=g).to(torch.uint8).to(DEVICE),
        "fisher": (torch.rand(N, generator=g) * 1e-9).to(DEVICE),
        "fisher_old": (torch.rand(N, generator=g) * 1e-9 + 1e-12).to(DEVICE),
    }


def authors_update_bits(bits, fisher, fisher_old, task) -> None:  # noqa: ANN001
    """The published update_bits + update_fisher chain (bits held as int64 there)."""
    c = 0.5 / math.log(2)
    gain = c * torch.log((fisher + fisher_old * (task + 1)) / (fisher_old * (task + 2)))
    grow = torch.ceil(gain).long().clamp_(min=0)
    bits.add_(grow).clamp_(max=MAX_BIT)
    fisher_old.mul_(task + 1).add_(fisher).div_(task + 2)
    fisher.zero_()


def test_bits_copy(benchmark):
    copy_same_bytes(benchmark, "update_bits/4M", BITS_BYTES * N)


def test_bits_unfused(benchmark, fisher_state):
    bits = fisher_state["bits"].long()
    fisher, fisher_old = fisher_state["fisher"].clone(), fisher_state["fisher_old"].clone()
    run(benchmark, lambda: authors_update_bits(bits, fisher, fisher_old, 1),
        "update_bits/4M", "unfused", BITS_BYTES * N)


@pytest.mark.parametrize("backend", bench_backends(DEVICE))
def test_bits_fused(benchmark, fisher_state, backend):
    bits = fisher_state["bits"].clone()
    fisher, fisher_old = fisher_state["fisher"].clone(), fisher_state["fisher_old"].clone()
    with bk.use_backend(backend), bk.value_checks(False):
        run(benchmark, lambda: bk.update_bits_(bits, fisher, fisher_old, 1, MAX_BIT),
            "update_bits/4M", backend, BITS_BYTES * N)


def test_sync_copy(benchmark):
    copy_same_bytes(benchmark, "sync/4M", SYNC_BYTES * N)


def test_sync_unfused(benchmark, tensors):
    w, prev = tensors["w"].clone(), tensors["prev"].clone()

    def sync() -> None:
        q = authors_quantize(w, tensors["bits"])
        w.copy_(q)
        prev.copy_(q)

    run(benchmark, sync, "sync/4M", "unfused", SYNC_BYTES * N)


@pytest.mark.parametrize("backend", bench_backends(DEVICE))
def test_sync_fused(benchmark, tensors, backend):
    w, prev = tensors["w"].clone(), tensors["prev"].clone()
    with bk.use_backend(backend):
        run(benchmark, lambda: bk.sync_(w, prev, tensors["bits"], BOUND),
            "sync/4M", backend, SYNC_BYTES * N)
