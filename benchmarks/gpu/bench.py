"""Kernel and train-step benchmarks for the GPU script, every baseline in the same run.

    python3 benchmarks/gpu/bench.py OUT.json [--device cuda|cpu] [--tiny] [--repeats N]

* elementwise (fused SGD step + projection, projection, quantize-STE forward, sync) per
  backend: achieved bandwidth over the bytes the op must move, against a plain
  ``dst.copy_(src)`` of the same number of bytes timed in the same run;
* Fisher Linear (2-D and 3-D input) and Conv2d per backend: TFLOP/s of the GEMM work,
  against torch's GEMM of the same shape and the weight-replication method, and the
  peak extra device memory of one call (CUDA only);
* a full training step, BLIP against finetune, on the MNIST-5 MLP.

``--tiny`` runs the same cases with small CPU-sized tensors (the CPU rehearsal).
Writes a JSON list of rows: {"group", "variant", "seconds", ...ratios}; a variant that
raises gets a row with its "error" instead, the rest still run, and the exit status is 1.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import blip_kernels as bk  # noqa: E402

Fn = Callable[[], object]


class Timer:
    """Median seconds per call of ``fn``: CUDA events on CUDA, perf_counter on CPU."""

    def __init__(self, device: torch.device, repeats: int) -> None:
        self.device, self.repeats = device, repeats

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __call__(self, fn: Fn, inner: int = 1) -> float:
        for _ in range(2):  # warm-up: first calls compile (Triton) and allocate
            fn()
        self.sync()
        times = []
        for _ in range(self.repeats):
            if self.device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(
                    enable_timing=True)
                start.record()
                for _ in range(inner):
                    fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3 / inner)
            else:
                t0 = time.perf_counter()
                for _ in range(inner):
                    fn()
                times.append((time.perf_counter() - t0) / inner)
        return statistics.median(times)

    def peak_extra_mb(self, fn: Fn) -> float | None:
        """Growth of the CUDA allocator's high-water mark over one call (None on CPU)."""
        if self.device.type != "cuda":
            return None
        self.sync()
        base = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        fn()
        self.sync()
        return (torch.cuda.max_memory_allocated(self.device) - base) / 2**20


def _backends(device: torch.device) -> list[str]:
    # The Triton interpreter on CPU is a correctness tool, not a timing subject.
    names = bk.available_backends(device)
    return [n for n in names if not (n == "triton" and device.type == "cpu")]


def _failed(group: str, variant: str, exc: Exception) -> dict:
    """A row for a variant that raised: recorded, and the other variants still run."""
    print(f"{group} {variant}: FAILED {type(exc).__name__}: {exc}", flush=True)
    return {"group": group, "variant": variant, "error": f"{type(exc).__name__}: {exc}"[:2000]}


def _with(backend: str, fn: Fn) -> Fn:
    def run() -> None:
        with bk.use_backend(backend):
            fn()
    return run


# ------------------------------------------------------------------ elementwise


def elementwise(timer: Timer, n: int, inner: int) -> list[dict]:
    dev = timer.device
    g = torch.Generator().manual_seed(0)
    bound, max_bit = 0.05, 20
    bits = torch.randint(0, max_bit + 1, (n,), generator=g, dtype=torch.uint8).to(dev)
    prev = bk.quantize(((torch.rand(n, generator=g) * 2 - 1) * bound).to(dev), bits, bound)
    w = prev + 1e-4 * torch.randn(n, generator=g).to(dev)
    grad = torch.randn(n, generator=g).to(dev)
    buf = torch.zeros(n, device=dev)
    # Bytes each op must move per element (fp32 weights): see benchmarks/README.md.
    ops: dict[str, tuple[int, Callable[[], Fn]]] = {
        "step": (25, lambda: lambda: bk.constrained_sgd_step_(
            w, grad, prev, bits, bound, max_bit, 1e-6, buf, 0.9, validate=False)),
        "project": (13, lambda: lambda: bk.project_(w, prev, bits, bound, max_bit)),
        "quantize_ste": (9, lambda: lambda: bk.quantize_ste(w, bits, bound)),
        "sync": (13, lambda: lambda: bk.sync_(w, prev, bits, bound)),  # idempotent: last
    }
    rows = []
    for op, (per_elem, make) in ops.items():
        nbytes = per_elem * n
        group = f"{op}/{n}"
        half = torch.empty(nbytes // 8, device=dev)  # half the bytes read, half written
        dst = torch.empty_like(half)
        t_copy = timer(lambda dst=dst, half=half: dst.copy_(half), inner)
        copy_bw = 2 * half.numel() * 4 / t_copy
        rows.append({"group": group, "variant": "copy", "seconds": t_copy,
                     "GB_per_s": copy_bw / 1e9, "fraction_of_copy_bw": 1.0})
        del half, dst
        for backend in _backends(dev):
            try:
                t = timer(_with(backend, make()), inner)
            except Exception as exc:  # noqa: BLE001 - one backend's failure is a result too
                rows.append(_failed(group, backend, exc))
                continue
            rows.append({"group": group, "variant": backend, "seconds": t,
                         "GB_per_s": nbytes / t / 1e9, "fraction_of_copy_bw": nbytes / t /
                         copy_bw})
    return rows


# ------------------------------------------------------------------ Fisher


def _fisher_rows(timer: Timer, group: str, flops: float, variants: dict[str, Fn],
                 gemm: str) -> list[dict]:
    rows = []
    for variant, fn in variants.items():
        try:
            t = timer(fn)
            peak = timer.peak_extra_mb(fn)
        except Exception as exc:  # noqa: BLE001 - one variant's failure is a result too
            rows.append(_failed(group, variant, exc))
            continue
        rows.append({"group": group, "variant": variant, "seconds": t,
                     "TFLOP_per_s": flops / t / 1e12, "peak_extra_MB": peak})
    by = {r["variant"]: r["seconds"] for r in rows if "seconds" in r}
    for r in rows:
        if "seconds" not in r:
            continue
        if gemm in by:
            r[f"speed_vs_{gemm}"] = by[gemm] / r["seconds"]
        if "replication" in by:
            r["speedup_vs_replication"] = by["replication"] / r["seconds"]
    return rows


def fisher_linear(timer: Timer, n: int, d_in: int, d_out: int) -> list[dict]:
    dev = timer.device
    x = torch.randn(n, d_in, device=dev)
    c = torch.randn(n, d_out, device=dev) / n
    fw, fb = torch.zeros(d_out, d_in, device=dev), torch.zeros(d_out, device=dev)
    w = torch.randn(d_out, d_in, device=dev)
    ct = c.t().contiguous()

    def replication() -> None:  # the published code's method: the weight once per sample
        rep = w.unsqueeze(0).repeat(n, 1, 1).requires_grad_()
        out = torch.bmm(rep, x.unsqueeze(2)).squeeze(2)
        (gr,) = torch.autograd.grad(out, rep, c)
        fw.add_((gr * gr).sum(0))

    variants: dict[str, Fn] = {"torch-gemm": lambda: torch.mm(ct, x)}
    for b in _backends(dev):
        variants[b] = _with(b, lambda: bk.fisher_linear_(fw, fb, x, c))
    variants["replication"] = replication
    return _fisher_rows(timer, f"fisher_linear/{d_in}x{d_out}/N{n}", 2.0 * n * d_in * d_out,
                        variants, "torch-gemm")


def fisher_linear_seq(timer: Timer, n: int, seq: int, d_in: int, d_out: int) -> list[dict]:
    dev = timer.device
    x = torch.randn(n, seq, d_in, device=dev)
    c = torch.randn(n, seq, d_out, device=dev) / n
    fw, fb = torch.zeros(d_out, d_in, device=dev), torch.zeros(d_out, device=dev)
    ct = c.transpose(1, 2).contiguous()
    variants: dict[str, Fn] = {"torch-bmm": lambda: torch.bmm(ct, x)}  # the per-sample GEMMs
    for b in _backends(dev):
        variants[b] = _with(b, lambda: bk.fisher_linear_(fw, fb, x, c))
    return _fisher_rows(timer, f"fisher_linear_seq/{d_in}x{d_out}/N{n}xL{seq}",
                        2.0 * n * seq * d_in * d_out, variants, "torch-bmm")


def fisher_conv(timer: Timer, n: int, cin: int, cout: int, hw: int, k: int) -> list[dict]:
    dev = timer.device
    x = torch.randn(n, cin, hw, hw, device=dev)
    c = torch.randn(n, cout, hw, hw, device=dev) / n
    fw, fb = torch.zeros(cout, cin, k, k, device=dev), torch.zeros(cout, device=dev)
    w = torch.randn(cout, cin, k, k, device=dev)
    cols = F.unfold(x, k, padding=k // 2)  # (n, cin·k·k, P), precomputed for the GEMM floor
    co = c.flatten(2)

    def replication() -> None:
        rep = w.repeat(n, 1, 1, 1).requires_grad_()  # (n·cout, cin, k, k)
        out = F.conv2d(x.reshape(1, n * cin, hw, hw), rep, padding=k // 2, groups=n)
        (gr,) = torch.autograd.grad(out, rep, c.reshape(1, n * cout, hw, hw))
        fw.add_((gr * gr).view(n, cout, cin, k, k).sum(0))

    variants: dict[str, Fn] = {"gemm-only": lambda: torch.bmm(co, cols.transpose(1, 2))}
    for b in _backends(dev):
        variants[b] = _with(b, lambda: bk.fisher_conv2d_(fw, fb, x, c, 1, k // 2))
    variants["replication"] = replication
    return _fisher_rows(timer, f"fisher_conv2d/{cin}-{cout}k{k}/{hw}x{hw}/N{n}",
                        2.0 * n * cout * cin * k * k * hw * hw, variants, "gemm-only")


# ------------------------------------------------------------------ train step


def train_step(timer: Timer, d_in: int, hidden: int, layers: int, batch: int,
               steps: int) -> list[dict]:
    from blip.methods import make_method  # noqa: PLC0415 - the library above the kernels
    from blip.models import MLP  # noqa: PLC0415

    dev = timer.device
    rows = []
    for method in ("finetune", "blip"):
        torch.manual_seed(0)
        m = make_method(method, MLP(d_in, hidden, [2] * 5, n_hidden_layers=layers))
        net = m.prepare().to(dev)
        m.before_task(0)
        opt = m.make_optimizer(0, 0.01)
        x = torch.randn(batch, d_in, device=dev)
        y = torch.randint(0, 2, (batch,), device=dev)

        def step(m=m, net=net, opt=opt, x=x, y=y) -> None:  # noqa: ANN001
            loss = m.training_loss(net, x, y, 0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            m.after_backward(0)
            opt.step()
            m.after_step(0)

        for _ in range(20):  # optimizer state, argument validation, kernel compilation
            step()
        t = timer(step, inner=steps)
        rows.append({"group": f"train_step/mlp{d_in}-{hidden}x{layers}/batch{batch}",
                     "variant": method, "seconds": t})
    base = rows[0]["seconds"]
    for r in rows:
        r["overhead_vs_finetune"] = r["seconds"] / base - 1
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="JSON file to write")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="small sizes (CPU rehearsal)")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    timer = Timer(torch.device(args.device), args.repeats)
    tiny = args.tiny
    if tiny:
        torch.set_num_threads(1)  # tiny CPU ops: thread wake-ups would dominate the timings
    # Cheapest and most asked-for first; the 256x4096->4096 Linear (its replication
    # baseline holds the weight 256 times, ~50 GB on a GPU) last. bench.json is rewritten
    # after every case, so a run cut short keeps the cases that finished.
    cases: list[tuple[str, Callable[[], list[dict]]]] = [
        ("elementwise", lambda: elementwise(timer, 1 << 12 if tiny else 1 << 26,
                                            2 if tiny else 10)),
        ("fisher_linear_paper", lambda: fisher_linear(timer, *((4, 12, 8) if tiny
                                                               else (100, 784, 1200)))),
        ("fisher_conv2d", lambda: fisher_conv(timer, *((2, 3, 4, 6, 3) if tiny
                                                       else (64, 64, 128, 32, 3)))),
        ("fisher_linear_seq", lambda: fisher_linear_seq(timer, *((3, 5, 16, 8) if tiny
                                                                 else (64, 128, 1024, 1024)))),
        ("train_step", lambda: train_step(timer, *((16, 8, 1, 8, 3) if tiny
                                                   else (784, 1200, 2, 64, 50)))),
        ("fisher_linear", lambda: fisher_linear(timer, *((8, 24, 16) if tiny
                                                         else (256, 4096, 4096)))),
    ]
    rows: list[dict] = []
    failed = []

    def write(done: list[str]) -> None:
        tmp = args.out.with_name(args.out.name + ".tmp")
        tmp.write_text(json.dumps({"device": args.device, "tiny": tiny, "cases_done": done,
                                   "complete": len(done) == len(cases), "rows": rows},
                                  indent=1))
        tmp.replace(args.out)

    done: list[str] = []
    write(done)
    for name, run in cases:
        t0 = time.perf_counter()
        try:
            new = run()
        except Exception as exc:  # noqa: BLE001 - record it and go on with the other cases
            failed.append(name)
            rows.append(_failed(name, "(whole case)", exc))
        else:
            rows.extend(new)
            failed += [f"{r['group']} {r['variant']}" for r in new if "error" in r]
            for r in new:
                if "error" in r:
                    continue
                extras = " ".join(f"{k}={v:.3g}" for k, v in r.items()
                                  if isinstance(v, float) and k != "seconds")
                print(f"{r['group']:<44} {r['variant']:<12} {r['seconds'] * 1e3:10.4f} ms "
                      f"{extras}", flush=True)
        print(f"-- {name}: {time.perf_counter() - t0:.1f} s", flush=True)
        done.append(name)
        write(done)
        if timer.device.type == "cuda":
            torch.cuda.empty_cache()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
