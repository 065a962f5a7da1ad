"""The cpp backend's Fisher kernels on tensors past 2^31 elements, against torch.

    python3 benchmarks/gpu/check_index64.py [--device cuda|cpu] [--tiny]

csrc/cuda/fisher.cu indexes in 32 bits unless a tensor has 2^31 elements or more; this
runs that 64-bit path on CUDA: a 3-D Linear input and a Conv2d input of ~2.15e9 bf16
elements (4.3 GB each), each compared with the sum of squared per-sample gradients that
torch computes sample by sample in fp32. ``--tiny`` runs the same comparisons on small
tensors (on CPU: a rehearsal of the script, not of the 64-bit path). Exits 1 on a mismatch.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import blip_kernels as bk  # noqa: E402

INT32_MAX = 2**31 - 1


def _compare(name: str, got: torch.Tensor, want: torch.Tensor, numel: int) -> bool:
    # Sums of 10^4-10^5 products in another order: relative to the largest entry.
    err = float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))
    ok = err <= 1e-4 and bool(torch.isfinite(got).all())
    path = "64-bit" if numel > INT32_MAX else "32-bit"
    print(f"{name}: x has {numel:,} elements ({path} index path); max |error| / max = "
          f"{err:.2e} -> {'ok' if ok else 'MISMATCH'}", flush=True)
    return ok


def linear_seq(dev: torch.device, n: int, seq: int, d_in: int, d_out: int) -> bool:
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(n, seq, d_in, device=dev, dtype=torch.bfloat16, generator=g)
    c = torch.randn(n, seq, d_out, device=dev, dtype=torch.bfloat16, generator=g)
    fw = torch.zeros(d_out, d_in, device=dev)
    with bk.use_backend("cpp"):
        bk.fisher_linear_(fw, None, x, c)
    want = torch.zeros_like(fw)
    for i in range(n):  # one sample's fp32 copy at a time
        gi = c[i].float().t() @ x[i].float()
        want += gi * gi
    return _compare(f"fisher_linear_ 3-D {tuple(x.shape)}", fw, want, x.numel())


def conv(dev: torch.device, n: int, cin: int, hw: int, cout: int, stride: int) -> bool:
    g = torch.Generator(device=dev).manual_seed(1)
    ho = (hw + 2 - 3) // stride + 1
    x = torch.randn(n, cin, hw, hw, device=dev, dtype=torch.bfloat16, generator=g)
    c = torch.randn(n, cout, ho, ho, device=dev, dtype=torch.bfloat16, generator=g)
    fw = torch.zeros(cout, cin, 3, 3, device=dev)
    with bk.use_backend("cpp"):
        bk.fisher_conv2d_(fw, None, x, c, stride, 1)
    want = torch.zeros_like(fw)
    for i in range(n):
        gi = torch.nn.grad.conv2d_weight(x[i:i + 1].float(), fw.shape, c[i:i + 1].float(),
                                         stride=stride, padding=1)
        want += gi * gi
    return _compare(f"fisher_conv2d_ {tuple(x.shape)} stride {stride}", fw, want, x.numel())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    why = bk.unavailable_reason("cpp", dev)
    if why:
        print(f"cpp backend unavailable on {dev}: {why}", file=sys.stderr)
        return 1
    if args.tiny:
        cases = [lambda: linear_seq(dev, 2, 33, 70, 5), lambda: conv(dev, 3, 2, 17, 4, 2)]
    else:
        # 2 * 32768 * 32769 and 64 * 16 * 1452^2 elements: both just past 2^31.
        cases = [lambda: linear_seq(dev, 2, 32768, 32769, 64),
                 lambda: conv(dev, 64, 16, 1452, 128, 4)]
    ok = True
    for case in cases:
        t0 = time.perf_counter()
        ok &= case()
        print(f"   {time.perf_counter() - t0:.1f} s", flush=True)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
