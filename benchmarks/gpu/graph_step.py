"""The CUDA-graph training step against the eager one (issue 18), for a GPU session.

    python3 benchmarks/gpu/graph_step.py [--device cuda] [--steps 300] [--json PATH]

For the MLP presets (pdigits: 64-100, batch 16; MNIST-5: 784-1200x2, batch 64) and the
methods blip and finetune: the same batches through ``make_step("eager")`` (autograd),
``make_step("off")`` (the default: the fused step where it applies) and
``make_step("cudagraph")`` from the same initial model; checks the losses and final states
are bit-identical (the graph replays the very kernels eager launches; the fused step calls
the ATen ops autograd calls) and reports steps/s of each, with the graph's and the fused
step's ratios over eager (target: graph >= 5x on the MLP presets). On a CPU device the graph
is the eager stand-in, so this is a rehearsal of the code path only (ratio ~1).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from blip.classification.step import make_step
from blip.methods import make_method
from blip.models import MLP

CASES = {"pdigits-mlp64-100-b16": (64, 100, 1, 16), "mnist5-mlp784-1200x2-b64": (784, 1200, 2, 64)}


def trajectory(method: str, mode: str, case: tuple, steps: int, device: torch.device
               ) -> tuple[list[float], dict, float]:
    fan_in, hidden, layers, batch = case
    torch.manual_seed(0)
    m = make_method(method, MLP(fan_in, hidden, [10] * 2, n_hidden_layers=layers))
    net = m.prepare().to(device)
    opt = m.make_optimizer(0, 0.01)
    step = make_step(mode, m, net, opt, 0, device)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(batch, fan_in, generator=g).to(device),
             torch.randint(0, 10, (batch,), generator=g).to(device)) for _ in range(steps)]
    losses = [step(x, y).detach().clone() for x, y in data[:3]]  # warm-up and capture
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t = time.perf_counter()
    for x, y in data[3:]:
        losses.append(step(x, y).detach().clone())
    sync()
    rate = (steps - 3) / (time.perf_counter() - t)
    if hasattr(step, "finish"):
        step.finish()
    return [float(v) for v in losses], {k: v.cpu() for k, v in net.state_dict().items()}, rate


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    device = torch.device(a.device)
    rows = []
    for name, case in CASES.items():
        for method in ("blip", "finetune"):
            le, se, re_ = trajectory(method, "eager", case, a.steps, device)
            lf, sf, rf = trajectory(method, "off", case, a.steps, device)
            lg, sg, rg = trajectory(method, "cudagraph", case, a.steps, device)
            same = all(lo == le and all(torch.equal(se[k], so[k]) for k in se)
                       for lo, so in ((lf, sf), (lg, sg)))
            rows.append({"case": name, "method": method, "eager_steps_per_s": re_,
                         "fused_steps_per_s": rf, "graph_steps_per_s": rg,
                         "speedup": rg / re_, "fused_speedup": rf / re_, "bit_identical": same})
            print(f"{name:28} {method:9} eager {re_:9.0f}/s  fused {rf:9.0f}/s  graph "
                  f"{rg:9.0f}/s  x{rg / re_:.2f} (fused x{rf / re_:.2f})  bit-identical {same}",
                  flush=True)
    if a.json:
        a.json.write_text(json.dumps({"device": str(device), "rows": rows}, indent=1))
    if not all(r["bit_identical"] for r in rows):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
