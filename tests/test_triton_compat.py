"""The one module that knows Triton versions apart (blip_kernels/triton/_compat.py), and
the interpreter behaviour it fixes: a loop over a run-time bound (triton 3.6 + numpy >= 2.4
raised TypeError on every such loop; 3.7 does not need the fix)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from blip_kernels.triton import _common, _compat  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@triton.jit
def _strided_sum_kernel(x_ptr, out_ptr, N, START, STEP, BLOCK: tl.constexpr):
    # Two loops over run-time bounds, as the Fisher kernels have: blocks of x, and a
    # strided walk starting at a run-time value.
    lanes = tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for i0 in range(0, N, BLOCK):
        acc += tl.load(x_ptr + i0 + lanes, mask=(i0 + lanes) < N, other=0.0)
    total = tl.sum(acc, axis=0)
    for i in range(START, N, STEP):
        total += tl.load(x_ptr + i)
    tl.store(out_ptr, total)


@pytest.mark.parametrize("n", [1, 31, 32, 100])
def test_loops_over_run_time_bounds_run(n: int) -> None:
    if DEVICE == "cpu" and not _common.INTERPRET:
        pytest.skip("CPU tensors need the interpreter (TRITON_INTERPRET=1 before import)")
    x = torch.arange(n, dtype=torch.float32, device=DEVICE)
    out = torch.zeros((), dtype=torch.float32, device=DEVICE)
    start, step = 1 % n, 3
    _strided_sum_kernel[(1,)](x, out, n, start, step, BLOCK=32)
    expected = x.sum() + x[start::step].sum()
    assert out.item() == expected.item()


def test_parse_version() -> None:
    assert _compat.parse_version("3.6.0") == (3, 6)
    assert _compat.parse_version("3.7.1+git0123abc") == (3, 7)
    assert _compat.parse_version("10.12") == (10, 12)
    with pytest.raises(ValueError, match="not a triton version"):
        _compat.parse_version("nightly")


def test_this_triton_is_a_tested_one_and_the_switch_follows_its_version() -> None:
    assert _compat.parse_version(triton.__version__) == _compat.VERSION
    assert _compat.VERSION in _compat.TESTED, triton.__version__
    assert (_compat.VERSION < (3, 7)) == _compat.NEEDS_INDEX_FIX


def test_the_fix_is_in_place_exactly_where_needed_and_idempotent() -> None:
    first = _compat.fix_interpreter_scalar_index()
    assert _compat.fix_interpreter_scalar_index() == first
    if _compat.NEEDS_INDEX_FIX:
        from triton.runtime import interpreter

        assert first and interpreter._patch_lang_tensor._blip_index_fix
    else:
        assert not first
