"""Backend registry: per-context overrides, CUDA availability, the missing-_C warning."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import threading

import pytest
import torch

import blip_kernels as bk
from blip_kernels import backends, cpp_backend

U8 = torch.uint8


def _bits_above_max_accepted() -> bool:
    """Whether this context currently lets bits > max_bit through (checks off)."""
    w = torch.zeros(4)
    try:
        bk.project_(w, w.clone(), torch.full((4,), 9, dtype=U8), 1.0, 4)
    except ValueError:
        return False
    return True


def test_value_checks_overlapping_blocks_in_two_threads():
    """Finding 5: A enters, B enters, A leaves, B leaves: checks must end up on again
    (a process-global flag restored in that order stays off) and never leak across."""
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    seen: dict[str, bool] = {}

    def a() -> None:
        with bk.value_checks(False):
            a_in.set()
            b_in.wait(10)
            seen["a_inside"] = _bits_above_max_accepted()
        a_out.set()

    def b() -> None:
        a_in.wait(10)
        seen["b_before"] = _bits_above_max_accepted()  # A's block is not B's
        with bk.value_checks(False):
            b_in.set()
            a_out.wait(10)
            seen["b_inside"] = _bits_above_max_accepted()

    threads = [threading.Thread(target=a), threading.Thread(target=b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert seen == {"a_inside": True, "b_before": False, "b_inside": True}
    assert not _bits_above_max_accepted()  # and the main thread never saw any of it


def test_use_backend_is_per_thread():
    inside, other = threading.Event(), threading.Event()
    seen: dict[str, str] = {}

    def override() -> None:
        with bk.use_backend("reference"):
            inside.set()
            other.wait(10)
            seen["override"] = bk.current_backend("cpu")

    def plain() -> None:
        inside.wait(10)
        seen["plain"] = bk.current_backend("cpu")
        other.set()

    auto = bk.current_backend("cpu")
    threads = [threading.Thread(target=override), threading.Thread(target=plain)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert seen == {"override": "reference", "plain": auto}


def test_value_checks_and_use_backend_are_per_asyncio_task():
    auto = bk.current_backend("cpu")

    async def relaxed(entered: asyncio.Event, done: asyncio.Event) -> tuple[bool, str]:
        with bk.value_checks(False), bk.use_backend("reference"):
            entered.set()
            await done.wait()  # the other task runs while this block is open
            return _bits_above_max_accepted(), bk.current_backend("cpu")

    async def strict(entered: asyncio.Event, done: asyncio.Event) -> tuple[bool, str]:
        await entered.wait()
        result = _bits_above_max_accepted(), bk.current_backend("cpu")
        done.set()
        return result

    async def main() -> tuple:
        entered, done = asyncio.Event(), asyncio.Event()
        return await asyncio.gather(relaxed(entered, done), strict(entered, done))

    assert asyncio.run(main()) == [(True, "reference"), (False, auto)]


def test_cuda_needs_a_usable_gpu(monkeypatch):
    monkeypatch.setattr(backends, "_cache", {})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bk.available_backends("cuda") == []
    assert "is_available() is False" in bk.unavailable_reason("reference", "cuda")
    if cpp_backend._C is not None and cpp_backend._C.has_cuda():
        assert "is_available() is False" in bk.unavailable_reason("cpp", "cuda")
    with pytest.raises(bk.BackendUnavailableError, match="no blip_kernels backend can run on cuda"):
        bk.current_backend("cuda")
    with bk.use_backend("cpp"), pytest.raises(bk.BackendUnavailableError, match="'cpp' cannot"):
        bk.current_backend("cuda")


def test_cpp_on_cuda_needs_both_the_build_and_a_gpu(monkeypatch):
    """Issue 10 item 6: cpp was listed for cuda where torch.cuda.is_available() is False."""

    class FakeC:
        def __init__(self, has_cuda: bool) -> None:
            self._has = has_cuda

        def has_cuda(self) -> bool:
            return self._has

    monkeypatch.setattr(cpp_backend, "_C", FakeC(True))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cpp_backend.unavailable_reason(torch.device("cuda")) == (
        "torch.cuda.is_available() is False")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert cpp_backend.unavailable_reason(torch.device("cuda")) is None
    monkeypatch.setattr(cpp_backend, "_C", FakeC(False))
    assert "built without CUDA" in cpp_backend.unavailable_reason(torch.device("cuda"))


def test_current_backend_names_what_runs():
    assert bk.current_backend() == bk.current_backend("cpu") == bk.current_backend(
        torch.device("cpu"))
    assert bk.current_backend("cpu") in bk.available_backends("cpu")
    with bk.use_backend("torch"):
        assert bk.current_backend("cpu") == "reference"
    assert bk.current_backend("meta") == "reference"
    with pytest.raises(TypeError, match="device must be a torch.device or a str"):
        bk.current_backend(0)


_NO_EXT = """
import sys, warnings
sys.modules["blip_kernels._C"] = None  # as if it was not built (BLIP_NO_EXT=1) or does not load
import torch
import blip_kernels as bk
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    assert bk.current_backend("cpu") == "reference"
    q = bk.quantize(torch.ones(3), torch.full((3,), 2, dtype=torch.uint8), 1.0)
    bk.quantize(torch.ones(3), torch.full((3,), 2, dtype=torch.uint8), 1.0)
    assert bk.available_backends("cpu") == ["reference"] + (["triton"] if "{triton}" else [])
assert q.tolist() == [1.0, 1.0, 1.0], q
fallback = [w for w in caught if issubclass(w.category, bk.backends.BackendFallbackWarning)]
assert len(fallback) == 1, [str(w.message) for w in caught]
msg = str(fallback[0].message)
assert "not built or does not load" in msg and "pip install --no-build-isolation -e ." in msg, msg
assert "BLIP_KERNELS_BACKEND=reference" in msg, msg
print("ok")
"""


def test_missing_extension_warns_once_and_falls_back():
    triton_ok = bk.unavailable_reason("triton", "cpu") is None
    code = textwrap.dedent(_NO_EXT).replace('"{triton}"', repr("yes" if triton_ok else ""))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    env.pop("BLIP_KERNELS_BACKEND", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]
