"""Shared fixtures. Runs before any test module imports blip_kernels."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

# Without a GPU the Triton kernels run under the interpreter; it must be switched
# on before triton decorates any kernel, i.e. before blip_kernels.triton imports.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from _support import backend_device_pairs  # noqa: E402

import blip_kernels  # noqa: E402

VECTORS = Path(__file__).parent / "data" / "reference_vectors.npz"


@pytest.fixture(scope="session")
def vectors() -> dict[str, torch.Tensor]:
    with np.load(VECTORS) as data:
        return {k: torch.from_numpy(data[k]) for k in data.files}


@pytest.fixture(params=backend_device_pairs(), ids=lambda p: f"{p[0]}-{p[1]}")
def backend(request: pytest.FixtureRequest):
    """Yields the device; ops inside the test run with the parametrized backend."""
    name, device = request.param
    with blip_kernels.use_backend(name):
        yield device


@pytest.fixture(scope="module")
def pdigits3():
    """The first three tasks of the embedded default stream."""
    pytest.importorskip("sklearn")
    from blip.data import load_benchmark

    return load_benchmark("pdigits", seed=0).truncated(3)
