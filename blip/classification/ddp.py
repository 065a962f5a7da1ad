"""Data-parallel glue of the classification trainer: join torchrun's process group, shard
each training batch under DistributedDataParallel, start torchrun for ``--nproc``.

The collectives and checks themselves (``rows``, ``all_reduce_sum_``, ``check_identical``,
...) live in :mod:`blip.distributed`; this module only applies them to the trainer.

How a 2-rank run stays equal to a 1-process run with the same global batch: every rank
iterates the same seeded global batches and forwards its ``rows()`` of each. DDP averages
the ranks' gradients, so rank ``r`` scales its loss by ``n_r * world / n``: the average is
then the global-batch gradient for any loss that is a per-sample mean plus terms that do
not depend on the samples (the methods' penalties). Only the reduction order differs (the
global gradient is the sum of two partial matmuls instead of one), so results agree to
rounding, not bitwise; after DDP's all-reduce every rank holds the same bits, applies the
same fused step and so keeps the same weights, momentum and frozen bits.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .. import validate
from ..distributed import check_identical, rows, stand_in, sync_rng_state, world
from ..methods import Method
from ..methods.base import check_distributed

#: what torchrun puts in every worker's environment
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
#: the most processes ``blip train --nproc`` starts on one machine
MAX_NPROC = 1024


@dataclass(frozen=True)
class Group:
    """Where this process stands: its rank, the world size, the backend (None: one process)
    and the device it computes on (``cuda:LOCAL_RANK`` for a CUDA run of several ranks)."""

    rank: int
    world: int
    backend: str | None
    device: torch.device


def launched_by_torchrun() -> bool:
    return all(k in os.environ for k in TORCHRUN_ENV)


def env_rank() -> int:
    """This process's rank as torchrun announced it (0 outside torchrun), readable before the
    process group exists (e.g. to give only rank 0 a TensorBoard writer)."""
    try:
        return int(os.environ.get("RANK", "0")) if launched_by_torchrun() else 0
    except ValueError:
        return 0


def _env_int(name: str) -> int:
    text = os.environ[name]
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"environment variable {name}={text!r} is not an integer (set by "
                         "torchrun; is this process started by something else?)") from None


def join(device: str) -> Group:
    """Join the process group torchrun described in the environment (gloo on CPU, NCCL on
    CUDA, one GPU per local rank), or the one the caller already initialised; a single
    process otherwise. ``device`` is the run's ``cpu`` / ``cuda`` / ``cuda:N``."""
    dev = torch.device(device)
    if not dist.is_initialized() and launched_by_torchrun() and _env_int("WORLD_SIZE") > 1:
        if dev.type == "cuda":
            if dev.index is not None:
                raise ValueError(f"device={device!r} with {_env_int('WORLD_SIZE')} ranks: give "
                                 "device='cuda'; each rank takes cuda:LOCAL_RANK")
            torch.cuda.set_device(_env_int("LOCAL_RANK"))
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    rank, size = world()
    if size == 1:
        return Group(0, 1, None, dev)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return Group(rank, size, str(dist.get_backend()), dev)


def leave() -> None:
    """End a run's process group after a run that succeeded on this rank: every rank waits
    for the others, then destroys it. A worker that exits while another still writes the
    run directory intermittently aborted at exit (rank 1: "terminate called without an
    active exception", SIGABRT, so `blip train --nproc 2` failed after a complete run).
    Not after an error: a barrier there could wait on a rank stuck in another collective,
    where exiting lets torchrun's agent stop the others."""
    if launched_by_torchrun() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def abandon() -> None:
    """End this rank's process group after an error, without waiting for the others
    (see leave): a worker that exited with its group still alive intermittently aborted
    in the group's destructor (SIGABRT, 3 of 12 runs of `blip train --nproc 2 --model
    alexnet`) instead of exiting with its error's status."""
    if launched_by_torchrun() and dist.is_initialized():
        with contextlib.suppress(RuntimeError, ValueError):
            dist.destroy_process_group()


def single_process_only(command: str) -> None:
    """Refuse to run ``command`` as several torchrun workers: they would be independent
    copies writing one run directory, not data-parallel ranks."""
    if launched_by_torchrun() and _env_int("WORLD_SIZE") > 1:
        raise ValueError(f"`blip {command}` is single-process (no distributed trainer); "
                         f"torchrun started {_env_int('WORLD_SIZE')} workers: run it alone")


def cpu_threads(requested: int | None, world_size: int) -> int:
    """Intra-op threads of one rank on CPU: ``requested``, else this machine's cores shared
    out between the ranks on it (torchrun's LOCAL_WORLD_SIZE; without torchrun, all
    ``world_size`` ranks are taken to share this machine): spinning workers of two ranks
    on one core cost more than they gain."""
    if requested is not None:
        return requested
    try:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    except ValueError:
        local = world_size
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // max(local, 1))


def check_supported(group: Group, method: type[Method], compile: str) -> None:
    """Refuse, before any work, what cannot train on several ranks: a method that says why
    (``Method.DISTRIBUTED``) and a step other than the eager one."""
    if group.world == 1:
        return
    check_distributed(method, group.world)
    if compile != "off":
        raise ValueError(f"compile={compile!r} is not supported on {group.world} ranks (the "
                         "distributed step is the eager one); use compile='off'")


def check_model(group: Group, net: nn.Module) -> None:
    """Refuse BatchNorm on several ranks: each rank would normalise with, and keep running
    statistics of, its own shard, so replicas and the 1-process run would part."""
    if group.world == 1:
        return
    bn = [n for n, m in net.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if bn:
        raise ValueError(f"the model has BatchNorm layers ({bn[0]}, ...), whose statistics each "
                         f"rank would compute on its own shard: training on {group.world} "
                         "ranks supports models without BatchNorm (mlp, alexnet)")


def check_start(net: nn.Module, method: Method, task: int) -> None:
    """Every rank starts from the same state: the same last finished task and bitwise the
    same model and method state (a fresh run: the same seed; a resume: the same file)."""
    check_identical({"task": torch.tensor(task)}, "start: last finished task")
    check_states(net, method, "start")


# torch 2.13 renamed broadcast_buffers to forward_sync_buffers (the old name warns)
_NO_BUFFER_SYNC = ({"forward_sync_buffers": False} if "forward_sync_buffers" in
                   inspect.signature(nn.parallel.DistributedDataParallel).parameters
                   else {"broadcast_buffers": False})


class _TaskLoss(nn.Module):
    """The method's training loss of task ``t`` as one module, so DDP sees the whole loss
    (every head LwF distils, HAT's gates) as one forward of the unwrapped network."""

    def __init__(self, method: Method, net: nn.Module, t: int) -> None:
        super().__init__()
        self.net = net
        self.method, self.t = method, t

    def forward(self, x: Tensor, y: Tensor, scale: float) -> Tensor:
        return self.method.training_loss(self.net, x, y, self.t) * scale


class ShardedLoss:
    """``loss(x, y)`` of a global batch on this rank: its ``rows()`` of the batch through
    the DDP-wrapped task loss, scaled so that DDP's gradient average is the global-batch
    gradient (module doc). A rank whose share is empty forwards one row with scale 0, so it
    still joins the all-reduce. Built once per task: the parameters that train change.
    ``ddp``: the DistributedDataParallel module (None when nothing trains)."""

    def __init__(self, method: Method, net: nn.Module, t: int, device: torch.device,
                 static_graph: bool = True) -> None:
        self.module = _TaskLoss(method, net, t)
        self.ddp: nn.parallel.DistributedDataParallel | None = None
        if any(p.requires_grad for p in self.module.parameters()):  # else DDP refuses it
            # No buffer is ever re-sent from rank 0 (that would hide a divergence of BLIP's
            # bits/prev/Fisher buffers; check_identical proves them equal instead): neither
            # at init (init_sync=False: the replicas are equal by construction, checked at
            # task end) nor before each forward. Other tasks' heads (HAT: embeddings) get no
            # gradient: static_graph records that once, on the first step (the set is the
            # same at every step of a task); find_unused_parameters would search the graph
            # at every step, 1.2-1.8x slower here (benchmarks/distributed.py).
            self.ddp = nn.parallel.DistributedDataParallel(
                self.module, device_ids=[device.index] if device.type == "cuda" else None,
                init_sync=False, find_unused_parameters=not static_graph,
                static_graph=static_graph, **_NO_BUFFER_SYNC)

    def __call__(self, x: Tensor, y: Tensor) -> Tensor:
        n = len(y)
        share = rows(n)
        n_r = share.stop - share.start
        scale = n_r * world()[1] / n
        padding = contextlib.nullcontext()
        if n_r == 0:
            share, padding = slice(0, 1), stand_in()  # methods count none of this row
        with padding:
            return (self.ddp or self.module)(x[share], y[share], scale)


def sharded_loss(method: Method, net: nn.Module, t: int, device: torch.device,
                 static_graph: bool = True) -> ShardedLoss:
    return ShardedLoss(method, net, t, device, static_graph)


def end_task(net: nn.Module, method: Method, t: int,
             sample_x: Tensor, sample_y: Tensor) -> dict:
    """The end of task ``t`` on every rank: one RNG state (dropout drew from each rank's
    own), the method's ``after_task`` (its Fisher / importance passes all-reduce), then the
    proof that the state every rank updated is bitwise the same."""
    sync_rng_state()
    stats = method.after_task(t, sample_x, sample_y) or {}
    check_states(net, method, f"end of task {t}")
    return stats


def check_states(net: nn.Module, method: Method, when: str) -> None:
    """:func:`blip.distributed.check_identical` over the model's state_dict (weights, bits,
    prev, fisher_old, heads) and the method's ``distributed_state()``."""
    check_identical(net.state_dict(), f"{when}: model")
    state = getattr(method, "distributed_state", None)
    if state is not None:
        check_identical(state(), f"{when}: method {method.name!r}")


def launch(nproc: int, argv: Sequence[str]) -> int:
    """``torchrun --standalone --nproc-per-node NPROC -m blip ARGV`` through torch's own
    elastic agent (torch.distributed.run); ``--nproc`` is dropped from ``argv``. Returns
    the exit status: 0, or 1 after naming the failed rank."""
    check_nproc(nproc)
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    rest = strip_option(list(argv), "--nproc")
    # torchrun sets OMP_NUM_THREADS=1 (with a warning) when unset; say it ourselves: the
    # trainer sets each rank's threads explicitly (cpu_threads)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    args = parse_args(["--standalone", f"--nproc-per-node={nproc}", "--module", "blip", *rest])
    try:
        run(args)
    except ChildFailedError as e:
        failures = ", ".join(f"rank {rank} ({_exit_text(f.exitcode)})"
                             for rank, f in sorted(e.failures.items()))
        print(f"blip train: error: {failures} of {nproc} failed (see its error above)",
              file=sys.stderr)
        return 1
    return 0


def _exit_text(code: int) -> str:
    return f"killed by signal {-code}" if code < 0 else f"exit code {code}"


def check_nproc(nproc: int) -> None:
    validate.number("nproc", nproc, lo=1, hi=MAX_NPROC, integer=True)


def strip_option(argv: list[str], name: str) -> list[str]:
    """``argv`` without ``NAME VALUE`` / ``NAME=VALUE``."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == name:
            skip = True
        elif not a.startswith(name + "="):
            out.append(a)
    return out


__all__ = ["Group", "MAX_NPROC", "TORCHRUN_ENV", "check_model", "check_nproc", "check_start",
           "check_states", "check_supported", "cpu_threads", "end_task", "env_rank", "join",
           "launch", "launched_by_torchrun", "leave", "ShardedLoss", "sharded_loss",
           "single_process_only",
           "strip_option"]
