"""The memory-bound ops on a 4M-element parameter: fused kernels vs the unfused composites.

The unfused step is what the authors' code runs after every batch: torch.optim.SGD's
step, then the clipping chain (diff, range, min, max, add, clamp) as separate ops.
"""

from __future__ import annotations

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
