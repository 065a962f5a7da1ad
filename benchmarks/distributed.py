"""Data-parallel throughput: ``python benchmarks/distributed.py [--steps N] [--reps R]``.

The classification trainer's distributed step (``blip.classification.ddp.ShardedLoss``
inside the step body of ``step.py``, BLIP's fused constrained update) on 1 process and on
2 gloo ranks of this machine (torch.multiprocessing spawn), same global batch:

* ``mlp``: the pdigits preset, MLP 64-100 with 5 heads, batch 16, on pdigits' real digits;
* ``alexnet``: an AlexNet-style conv net (blip.models.AlexNet, width 1: convs 64/128/256,
  fc 2048) on a synthetic stream of 512 random 3x32x32 images, 10 classes, batch 32
  (the cifar presets' batch).

Variants: 1 process with 1 and with 2 intra-op threads; 2 ranks x 1 thread with DDP's
all-reduce as the trainer builds it (``static_graph=True``), with communication disabled
(a comm hook that returns the local gradient: the same step without the all-reduce, so
``1 - t_nocomm / t_comm`` is the share of the step spent communicating), with
``find_unused_parameters=True`` instead of the static graph, and with a comm hook that runs
the all-reduce blocking and times it (``2rank-timed``: the share of rank 0's step spent in
it, waiting for the other rank included; no overlap with the backward). Each repetition spawns the
1-process and the 2-rank variants in turn (interleaved); the table gives the median
samples/s and the range over the repetitions.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

MODELS = ("mlp", "alexnet")
BATCH = {"mlp": 16, "alexnet": 32}


def _setup(model: str) -> tuple[Any, Any, torch.Tensor, torch.Tensor]:
    from blip import models
    from blip.classification.data import load_benchmark
    from blip.methods import make_method

    torch.manual_seed(0)
    if model == "mlp":
        task = load_benchmark("pdigits", seed=0)[0]
        x, y = task.inputs(task.x_train), task.y_train
        net = models.MLP(x.shape[1], hidden=100, classes_per_task=[10] * 5)
    else:
        x, y = torch.randn(512, 3, 32, 32), torch.randint(0, 10, (512,))
        net = models.AlexNet((3, 32, 32), [10] * 2)
    method = make_method("blip", net, F_prior=1e-15)
    return method, method.prepare(), x, y


def _no_comm(_, bucket):  # noqa: ANN001, ANN202 - DDP refuses string annotations here
    """A DDP comm hook that skips the all-reduce: each rank keeps its own gradient."""
    fut = torch.futures.Future()
    fut.set_result(bucket.buffer())
    return fut


class _Clock:
    seconds = 0.0


def _timed_all_reduce(clock, bucket):  # noqa: ANN001, ANN202 - as _no_comm
    """DDP's averaging all-reduce, but blocking and timed: the seconds a rank spends in
    communication (waiting for the other rank included), without overlap with backward."""
    t0 = time.perf_counter()
    buf = bucket.buffer().div_(dist.get_world_size())
    dist.all_reduce(buf)
    clock.seconds += time.perf_counter() - t0
    fut = torch.futures.Future()
    fut.set_result(buf)
    return fut


def _time_steps(model: str, variant: str, steps: int) -> float:
    """Seconds of ``steps`` training steps (after 3 warm-up steps), barrier to barrier;
    for ``2rank-timed`` the share of them spent in the all-reduce instead."""
    from blip.classification import ddp
    from blip.classification.step import _step_around, eager_step

    method, net, x, y = _setup(model)
    method.before_task(0)
    opt = method.make_optimizer(0, 0.01)
    net.train()
    if variant.startswith("1proc"):
        step = eager_step(method, net, opt, 0)
    else:
        loss = ddp.ShardedLoss(method, net, 0, torch.device("cpu"),
                               static_graph=variant != "2rank-find-unused")
        clock = _Clock()
        if variant == "2rank-nocomm":
            loss.ddp.register_comm_hook(None, _no_comm)
        if variant == "2rank-timed":
            loss.ddp.register_comm_hook(clock, _timed_all_reduce)
        step = _step_around(loss, method, opt, 0)
    b = BATCH[model]
    batches = [(x[i:i + b], y[i:i + b]) for i in range(0, len(y) - b + 1, b)]
    for i in range(3):
        step(*batches[i % len(batches)])
    if dist.is_initialized():
        dist.barrier()
        clock.seconds = 0.0
    t0 = time.perf_counter()
    for i in range(steps):
        step(*batches[i % len(batches)])
    if dist.is_initialized():
        dist.barrier()
    elapsed = time.perf_counter() - t0
    return clock.seconds / elapsed if variant == "2rank-timed" else elapsed


def _worker(rank: int, world: int, store: str, out: str, steps: dict[str, int]) -> None:
    if world > 1:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method="file://" + store, rank=rank,
                                world_size=world)
    res: dict[str, float] = {}
    for model in MODELS:
        if world == 1:
            for threads in (1, 2):
                torch.set_num_threads(threads)
                res[f"{model}/1proc-{threads}t"] = _time_steps(model, "1proc", steps[model])
        else:
            for v in ("2rank", "2rank-nocomm", "2rank-find-unused", "2rank-timed"):
                res[f"{model}/{v}"] = _time_steps(model, v, steps[model])
    if world > 1:
        dist.destroy_process_group()
    if rank == 0:
        Path(out).write_text(json.dumps(res))


def _spawn(world: int, steps: dict[str, int]) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as d:
        out = f"{d}/out.json"
        mp.spawn(_worker, args=(world, f"{d}/store", out, steps), nprocs=world, join=True)
        return json.loads(Path(out).read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=200, help="timed steps per variant (MLP; "
                    "the conv net runs a tenth of them)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", help="also write the raw figures here")
    a = ap.parse_args()
    times: dict[str, list[float]] = {}
    steps = {"mlp": a.steps, "alexnet": max(a.steps // 10, 2)}
    for _ in range(a.reps):
        for world in (1, 2):
            for k, v in _spawn(world, steps).items():
                times.setdefault(k, []).append(v)
    shares = {k.split("/")[0]: v for k, v in times.items() if k.endswith("/2rank-timed")}
    rows = []
    for key, ts in times.items():
        model, variant = key.split("/")
        if variant == "2rank-timed":
            continue
        rate = [steps[model] * BATCH[model] / t for t in ts]
        rows.append((model, variant, statistics.median(rate), min(rate), max(rate)))
    comm = {}
    for model in MODELS:
        t_c = statistics.median(times[f"{model}/2rank"])
        t_n = statistics.median(times[f"{model}/2rank-nocomm"])
        comm[model] = 1 - t_n / t_c
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{a.reps} reps, {a.steps} steps")
    print("| model | variant | samples/s (median) | range |")
    print("| --- | --- | ---: | --- |")
    for model, variant, med, lo, hi in rows:
        print(f"| {model} | {variant} | {med:,.0f} | {lo:,.0f}-{hi:,.0f} |")
    for model, share in comm.items():
        timed = shares[model]
        print(f"{model}: communication {100 * share:.0f}% of a 2-rank step (1 - no-all-reduce "
              f"time / time); timed blocking all-reduce {100 * statistics.median(timed):.0f}% "
              f"({100 * min(timed):.0f}-{100 * max(timed):.0f}%) of its step")
    if a.json:
        Path(a.json).write_text(json.dumps({"times": times, "comm_share": comm,
                                            "steps": a.steps, "reps": a.reps}, indent=1))


if __name__ == "__main__":
    main()
