"""Fisher accumulation: fused kernels vs weight replication (and, for conv, the GEMMs alone)."""

from __future__ import annotations

import pytest
from _bench import DEVICE, bench_backends, run
from _memory import peak_extra_mb
from fisher_cases import CASES

VARIANTS = {
    "linear": ["replication", *bench_backends(DEVICE)],
    "conv": ["replication", "gemm-only", *bench_backends(DEVICE)],
}
GROUPS = {"linear": "fisher_linear/784x1200-N100", "conv": "fisher_conv2d/64x128k3-16x16-N64"}
PARAMS = [(case, v) for case, vs in VARIANTS.items() for v in vs]


@pytest.mark.parametrize(("case", "variant"), PARAMS, ids=[f"{c}-{v}" for c, v in PARAMS])
def test_fisher(benchmark, case, variant):
    fn, warm = CASES[case](variant)
    warm()
    extra = {}
    if DEVICE == "cpu":  # host RSS says nothing about GPU memory
        extra["peak_extra_MB"] = peak_extra_mb(case, variant)
    group = GROUPS[case]
    run(benchmark, fn, group, variant, rounds=5 if variant == "replication" else 10, **extra)
