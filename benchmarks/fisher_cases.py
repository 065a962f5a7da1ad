"""Inputs and variants of the Fisher benchmarks (shared by timing and memory runs).

Sizes from the issue: an MLP layer 784→1200 with N=100, and an AlexNet-style conv
64→128, k=3, 16×16, padding 1, N=64. ``replication`` is the published code's method:
copy the weight once per sample, run the batch as a bmm / grouped conv, take the
gradient of the copies, square, sum. ``gemm-only`` is the lower bound for conv: the
per-sample GEMMs alone on a precomputed unfold (no squaring, no accumulation).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

import blip_kernels as bk

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
Fn = Callable[[], object]


def _kernel(variant: str, call: Fn) -> Fn:
    def fn() -> None:
        with bk.use_backend(variant):
            call()
    return fn


def linear(variant: str, n: int = 100, d_in: int = 784, d_out: int = 1200) -> tuple[Fn, Fn]:
    x = torch.randn(n, d_in, device=DEVICE)
    c = torch.randn(n, d_out, device=DEVICE) / n
    fw, fb = torch.zeros(d_out, d_in, device=DEVICE), torch.zeros(d_out, device=DEVICE)
    if variant == "replication":
        w = torch.randn(d_out, d_in, device=DEVICE)

        def fn() -> None:
            rep = w.unsqueeze(0).repeat(n, 1, 1).requires_grad_()
            out = torch.bmm(rep, x.unsqueeze(2)).squeeze(2)
            (g,) = torch.autograd.grad(out, rep, c)
            fw.add_((g * g).sum(0))
            fb.add_((c * c).sum(0))
    else:
        fn = _kernel(variant, lambda: bk.fisher_linear_(fw, fb, x, c))
    return fn, lambda: linear(variant, 2, 3, 4)[0]()


def conv(variant: str, n: int = 64, cin: int = 64, cout: int = 128, hw: int = 16,
         k: int = 3) -> tuple[Fn, Fn]:
    x = torch.randn(n, cin, hw, hw, device=DEVICE)
    c = torch.randn(n, cout, hw, hw, device=DEVICE) / n
    fw = torch.zeros(cout, cin, k, k, device=DEVICE)
    fb = torch.zeros(cout, device=DEVICE)
    if variant == "replication":
        w = torch.randn(cout, cin, k, k, device=DEVICE)

        def fn() -> None:
            rep = w.repeat(n, 1, 1, 1).requires_grad_()  # (n·cout, cin, k, k)
            out = F.conv2d(x.reshape(1, n * cin, hw, hw), rep, padding=k // 2, groups=n)
            (g,) = torch.autograd.grad(out, rep, c.reshape(1, n * cout, hw, hw))
            fw.add_((g * g).view(n, cout, cin, k, k).sum(0))
            fb.add_((c.sum((2, 3)) ** 2).sum(0))
    elif variant == "gemm-only":
        cols = F.unfold(x, k, padding=k // 2)  # (n, cin·k·k, P), precomputed
        co = c.flatten(2)  # (n, cout, P)

        def fn() -> None:
            torch.bmm(co, cols.transpose(1, 2))
    else:
        fn = _kernel(variant, lambda: bk.fisher_conv2d_(fw, fb, x, c, 1, k // 2))
    return fn, lambda: conv(variant, 2, 2, 3, 4, 3)[0]()


CASES = {"linear": linear, "conv": conv}
