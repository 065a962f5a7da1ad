"""Run a function on N ranks of a gloo process group (torch.multiprocessing spawn).

``run_ranks(fn, tmp_path, *args)`` calls ``fn(*args)`` on every rank once the group is up and
returns each rank's return value (plain data: tensors, numbers, strings, lists,
dicts), in rank order. ``fn`` must be a module-level function of
an importable module (a test module is: spawn hands the children the parent's sys.path).
Each child imports torch afresh (~1-2 s), so a test module spawns once and checks many
things on the results.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _child(rank: int, world: int, store: str, out: str, fn: Callable[..., Any],
           args: tuple) -> None:
    torch.set_num_threads(1)  # two ranks share this machine's cores
    dist.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=world)
    try:
        result = fn(*args)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    torch.save(result, f"{out}.{rank}")


def run_ranks(fn: Callable[..., Any], tmp_path: Path, *args: Any, world: int = 2) -> list[Any]:
    store, out = tmp_path / "pg.store", tmp_path / "result"
    mp.spawn(_child, args=(world, str(store), str(out), fn, args), nprocs=world, join=True)
    return [torch.load(f"{out}.{r}", weights_only=True) for r in range(world)]
