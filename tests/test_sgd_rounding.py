"""The fused SGD step rounds exactly as torch.optim.SGD does (issue 17, item 2).

torch 2.13 rounds each ``x.add(y, alpha=a)`` of SGD.step once (an FMA: ATen's CPU add
kernel in its AVX2/AVX512 builds, the CUDA foreach kernels) and ``buf.mul_(momentum)``
separately; csrc/blip_math.h has the findings. So with the BLIP projection made a
no-op, ConstrainedSGD must be bit-identical to torch.optim.SGD step after step.

The projection is the identity when ``bits == 0`` and ``prev == 0`` (a fresh layer):
``r = bound * 2^0`` admits any ``|w| <= bound``, ``prev + (w - prev)`` is exactly
``w`` because prev is 0, and the global clamp ``±bound·(1 - 2^-max_bit)`` does not
bite for a huge bound. (Only ``w == -0.0`` would come back as ``+0.0``; random
weights never hit it.)
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn
from torch.optim.sgd import sgd as torch_sgd  # the functional code of SGD.step

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import blip_kernels  # noqa: E402
from blip import ConstrainedSGD  # noqa: E402
from blip.nn import QuantLinear  # noqa: E402
from blip_kernels import backends  # noqa: E402

#: Large enough that neither clamp of the projection can bite, small enough for fp32.
HUGE_BOUND = 1e30
#: numel of the 1-row layers: below, at and around the vector widths and OpenMP grain.
SIZES = (1, 7, 1025, 3333)
SHAPE_2D = (29, 37)
CONFIGS = {
    "plain": {"momentum": 0.0, "dampening": 0.0, "nesterov": False, "weight_decay": 0.0},
    "momentum": {"momentum": 0.9, "dampening": 0.0, "nesterov": False, "weight_decay": 0.0},
    "dampening+wd": {"momentum": 0.9, "dampening": 0.1, "nesterov": False,
                     "weight_decay": 5e-4},
    "nesterov+wd": {"momentum": 0.9, "dampening": 0.0, "nesterov": True, "weight_decay": 1e-3},
    "wd-only": {"momentum": 0.0, "dampening": 0.0, "nesterov": False, "weight_decay": 3e-2},
}
LR = 0.01
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _steps(name: str) -> int:
    # The interpreter runs each kernel launch in Python (5 launches a step, 35-130 ms a
    # step on a loaded 2-core machine): 150 steps there.
    return 150 if name == "triton" and INTERPRETED else 1000


def _backends() -> list[str]:
    return [n for n in ("reference", "cpp", "triton")
            if backends.unavailable_reason(n, DEVICE) is None]


def _model(dtype: torch.dtype, device: torch.device) -> nn.ModuleList:
    torch.manual_seed(0)
    layers = [QuantLinear(n, 1, bias=False) for n in SIZES]
    layers.append(QuantLinear(SHAPE_2D[1], SHAPE_2D[0], bias=False))
    model = nn.ModuleList(layers).to(device=device, dtype=dtype)
    for layer in model:
        layer.weight_bound = HUGE_BOUND  # bits and prev stay 0: the projection is a no-op
        assert not layer.bits_weight.any() and not layer.prev_weight.any()
    return model


def _run_both(name: str, dtype: torch.dtype, cfg: dict, lr: float, steps: int
              ) -> tuple[list[torch.Tensor], list[torch.Tensor], int]:
    """Runs ConstrainedSGD (backend ``name``) and torch.optim.SGD on the same weights and
    gradients; returns both weight lists and the first step at which they differed."""
    device = DEVICE
    model = _model(dtype, device)
    ours = [layer.weight for layer in model]
    theirs = [p.detach().clone().requires_grad_(True) for p in ours]
    opt = ConstrainedSGD(model, lr=lr, **cfg)
    ref = torch.optim.SGD(theirs, lr=lr, **cfg)
    gen = torch.Generator().manual_seed(1)
    first_diff = -1
    with blip_kernels.use_backend(name):
        for step in range(steps):
            for a, b in zip(ours, theirs, strict=True):
                g = torch.randn(a.shape, generator=gen).to(device=device, dtype=dtype)
                a.grad, b.grad = g.clone(), g.clone()
            opt.step()
            ref.step()
            if first_diff < 0 and not all(torch.equal(a, b) for a, b in zip(ours, theirs,
                                                                               strict=True)):
                first_diff = step
    return [p.detach() for p in ours], [p.detach() for p in theirs], first_diff


def _describe(ours: list[torch.Tensor], theirs: list[torch.Tensor]) -> str:
    return ", ".join(f"{tuple(a.shape)}: {int((a != b).sum())} differ"
                     for a, b in zip(ours, theirs, strict=True))


@pytest.mark.parametrize("cfg", list(CONFIGS), ids=list(CONFIGS))
@pytest.mark.parametrize("name", _backends())
def test_constrained_sgd_matches_torch_sgd_fp32(name: str, cfg: str) -> None:
    """fp32: 1000 steps (150 under the Triton interpreter), bit for bit."""
    ours, theirs, first = _run_both(name, torch.float32, CONFIGS[cfg], LR, _steps(name))
    assert first < 0, f"{name}/{cfg}: first differs at step {first}; {_describe(ours, theirs)}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", _backends())
def test_constrained_sgd_matches_torch_sgd_low_precision(name: str, dtype: torch.dtype) -> None:
    """bf16/fp16 parameters, plain SGD with a power-of-two lr: lr·g is then exact, and
    torch and the fused step both round w - lr·g once to the dtype. (This held before
    the fused multiply-add too; it pins the extent of the low-precision claim.)

    Not covered, by design: momentum or weight decay (the fused step keeps an fp32
    momentum buffer and fp32 intermediates where torch.optim.SGD rounds each to the
    parameter dtype), and other lrs: torch's CPU add rounds alpha to the dtype, and in
    its scalar tail (the last n mod 32 elements) rounds alpha·g to the dtype before
    adding, so its own result depends on an element's position; the fused step does
    fp32 math for every element.
    """
    lr = 2.0**-6
    ours, theirs, first = _run_both(name, dtype, CONFIGS["plain"], lr, _steps(name))
    assert first < 0, f"{name}/{dtype}: first differs at step {first}; {_describe(ours, theirs)}"


def _op_step(name: str, w, g, buf, cfg: dict) -> None:
    n = w.numel()
    bits = torch.zeros(n, dtype=torch.uint8, device=w.device)
    prev = torch.zeros(n, device=w.device)
    with blip_kernels.use_backend(name):
        blip_kernels.constrained_sgd_step_(
            w, g, prev, bits, HUGE_BOUND, 20, LR, buf, cfg["momentum"], cfg["dampening"],
            cfg["nesterov"], cfg["weight_decay"])


@pytest.mark.parametrize("cfg", [c for c in CONFIGS if CONFIGS[c]["momentum"]])
@pytest.mark.parametrize("name", _backends())
def test_fused_op_one_step_matches_torch_every_size(name: str, cfg: str) -> None:
    """The op itself, from an existing momentum buffer, against torch's functional SGD
    (the code of SGD.step) at every size 1..70 and around 1024: vector bodies and
    scalar tails of both implementations."""
    c = CONFIGS[cfg]
    device = DEVICE
    gen = torch.Generator().manual_seed(2)
    sizes = [*range(1, 71), 1023, 1024, 1025, 4099]
    for n in sizes:
        w = torch.randn(n, generator=gen).to(device)
        g = torch.randn(n, generator=gen).to(device)
        buf = torch.randn(n, generator=gen).to(device)
        w2, buf2 = w.clone(), [buf.clone()]
        torch_sgd([w2], [g.clone()], buf2, lr=LR, maximize=False, foreach=False, **c)
        _op_step(name, w, g, buf, c)
        assert torch.equal(buf, buf2[0]), f"{name}/{cfg} n={n}: momentum buffer differs"
        assert torch.equal(w, w2), f"{name}/{cfg} n={n}: {int((w != w2).sum())} weights differ"
