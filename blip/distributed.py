"""The few collectives BLIP needs across data-parallel ranks (torch.distributed).

Every function is the identity (or a no-op) when torch.distributed is not initialised or
the world has one rank, so single-process runs compute exactly what they computed before
this module existed. The process group itself is torchrun's / the caller's business
(``init_process_group``); nothing here launches processes or opens sockets.

Why these and not DDP alone: DDP averages gradients, but BLIP's end-of-task state (the
Fisher, then bits / prev / fisher_old) is computed outside the training forward. The
Fisher pass shards its sample over ranks (:func:`rows`, :func:`all_gather_rows` for the
logits the targets are sampled from) and sums the accumulators once
(:func:`all_reduce_sum_`); :func:`check_identical` then proves cheaply that the state every
rank updated is bitwise the same, instead of hiding a divergence by re-broadcasting it.
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Iterator, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import Tensor


class StateMismatchError(ValueError):
    """State that must be identical on every rank differs (names the tensor and the ranks)."""


def world() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_distributed() -> bool:
    """True when more than one rank takes part."""
    return world()[1] > 1


def rows(n: int) -> slice:
    """This rank's contiguous share of ``n`` rows, sized as ``torch.tensor_split`` sizes its
    chunks (the first ``n % world`` ranks get one row more); rank order is row order."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"rows: n must be an int >= 0; got {n!r}")
    rank, size = world()
    base, extra = divmod(n, size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


def _comm_device(like: Tensor | None = None) -> torch.device:
    """Where a collective's buffer must live: NCCL only moves CUDA tensors."""
    if dist.get_backend() == "nccl":
        if like is not None and like.is_cuda:
            return like.device
        return torch.device("cuda", torch.cuda.current_device())
    return like.device if like is not None else torch.device("cpu")


def _check_tensors(what: str, tensors: object) -> list[Tensor]:
    if isinstance(tensors, Tensor) or not isinstance(tensors, Sequence):
        raise TypeError(f"{what}: tensors must be a sequence of tensors; got "
                        f"{type(tensors).__name__}")
    out = list(tensors)
    for i, t in enumerate(out):
        if not isinstance(t, Tensor):
            raise TypeError(f"{what}: tensors[{i}] must be a Tensor; got {type(t).__name__}")
    return out


def _by_dtype_device(tensors: list[Tensor]) -> dict[tuple[torch.dtype, torch.device],
                                                    list[Tensor]]:
    groups: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    return groups


def _flat_collective_(tensors: list[Tensor], op: str, src: int) -> None:
    """One collective per (dtype, device) group on a flattened copy, results copied back."""
    for group in _by_dtype_device(tensors).values():
        flat = torch.cat([t.reshape(-1) for t in group])
        moved = flat.to(_comm_device(flat))
        if op == "sum":
            dist.all_reduce(moved, op=dist.ReduceOp.SUM)
        else:
            dist.broadcast(moved, src=src)
        flat = moved.to(flat.device)
        offset = 0
        for t in group:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()


def all_reduce_sum_(tensors: Sequence[Tensor]) -> None:
    """Sum each tensor over all ranks, in place (one flattened call per dtype and device).

    Every rank receives the same bits (the backends reduce each element once and send the
    result), so the sums stay identical across ranks."""
    ts = _check_tensors("all_reduce_sum_", tensors)
    for i, t in enumerate(ts):
        if t.dtype == torch.bool:
            raise TypeError(f"all_reduce_sum_: tensors[{i}] is bool; a sum needs numbers")
    if is_distributed() and ts:
        _flat_collective_(ts, "sum", 0)


def broadcast_(tensors: Sequence[Tensor], src: int = 0) -> None:
    """Overwrite each tensor with rank ``src``'s, in place."""
    ts = _check_tensors("broadcast_", tensors)
    size = world()[1]
    if isinstance(src, bool) or not isinstance(src, int) or not 0 <= src < size:
        raise ValueError(f"broadcast_: src must be a rank in [0, {size}); got {src!r}")
    if size > 1 and ts:
        _flat_collective_(ts, "broadcast", src)


def all_gather_rows(t: Tensor) -> Tensor:
    """The concatenation, in rank order, of every rank's ``t`` along dim 0.

    The ranks' row counts may differ (the shares of :func:`rows`); the other dimensions and
    the dtype must agree. Padded internally to the largest share."""
    if not isinstance(t, Tensor) or t.dim() == 0:
        raise TypeError(f"all_gather_rows: t must be a Tensor with a row dimension; got "
                        f"{getattr(t, 'shape', type(t).__name__)}")
    _, size = world()
    if size == 1:
        return t
    device = _comm_device(t)
    # rows and a code of (trailing shape, dtype): unequal ones would fail deep inside gloo
    layout = zlib.crc32(f"{tuple(t.shape[1:])}:{t.dtype}".encode())
    heads = [torch.zeros(2, dtype=torch.int64, device=device) for _ in range(size)]
    dist.all_gather(heads, torch.tensor([t.shape[0], layout], dtype=torch.int64, device=device))
    ns = [int(h[0]) for h in heads]
    if len({int(h[1]) for h in heads}) > 1:
        raise ValueError(f"all_gather_rows: the ranks' tensors differ beyond the row count "
                         f"(this rank: shape {tuple(t.shape)}, {t.dtype})")
    most = max(ns)
    padded = torch.zeros((most, *t.shape[1:]), dtype=t.dtype, device=device)
    padded[: t.shape[0]] = t.detach()
    parts = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:k] for p, k in zip(parts, ns, strict=True)]).to(t.device)


# -- stand-in rows ----------------------------------------------------------------------

#: True while this rank forwards a stand-in row (module-wide: one training step at a time)
_STAND_IN = False


@contextlib.contextmanager
def stand_in() -> Iterator[None]:
    """Mark a forward whose rows are a stand-in, not this rank's share: a rank whose share of
    a batch is empty (fewer rows than ranks) forwards one row with weight 0 so that it still
    joins DDP's all-reduce. Methods that count the rows they train on count none of it
    (:func:`counted_rows`), or a 1-row batch on 2 ranks would count as 2."""
    global _STAND_IN
    before, _STAND_IN = _STAND_IN, True
    try:
        yield
    finally:
        _STAND_IN = before


def counted_rows(n: int) -> int:
    """``n``, the rows of this rank's training forward; 0 inside :func:`stand_in`."""
    return 0 if _STAND_IN else n


# -- checksums ---------------------------------------------------------------------------

#: words per row of the checksum's 2-D view (the tensor's words, zero-padded)
_ROW = 1024
#: (numel, Σ words, Σ column sums·(column+1), Σ row sums·(row+1)): a flipped bit changes the
#: plain sum; two swapped words change the column-weighted sum unless they share a column,
#: then the row-weighted one. int64 arithmetic wraps, identically on every rank.
_FIELDS = 4


def _words(t: Tensor) -> Tensor:
    """The tensor's raw bytes as the widest integer words (at most 32 bits, so the weighted
    sums stay far from int64's range) that tile them."""
    raw = t.detach().contiguous().reshape(-1).view(torch.uint8)
    for dtype, width in ((torch.int32, 4), (torch.int16, 2)):
        if raw.numel() % width == 0:
            return raw.view(dtype)
    return raw


def checksum(t: Tensor) -> Tensor:
    """:data:`_FIELDS` int64 numbers, on CPU, that differ for tensors whose bytes differ by a
    flipped bit or a swap of two words (see :data:`_FIELDS`). Two reductions over the
    words, no int64 copy of them."""
    w = _words(t)
    pad = (-w.numel()) % _ROW
    if pad:
        w = torch.cat([w, w.new_zeros(pad)])
    grid = w.view(-1, _ROW)
    cols = grid.sum(0, dtype=torch.int64)
    rows = grid.sum(1, dtype=torch.int64)
    col_w = torch.arange(1, _ROW + 1, dtype=torch.int64, device=w.device)
    row_w = torch.arange(1, rows.numel() + 1, dtype=torch.int64, device=w.device)
    return torch.stack([torch.tensor(t.numel(), dtype=torch.int64, device=w.device),
                        cols.sum(), (cols * col_w).sum(), (rows * row_w).sum()]).cpu()


def _layout_code(named: Mapping[str, Tensor]) -> int:
    text = "\n".join(f"{k}:{tuple(v.shape)}:{v.dtype}" for k, v in named.items())
    return zlib.crc32(text.encode())


def check_identical(named: Mapping[str, Tensor], what: str) -> None:
    """Raise :class:`StateMismatchError` unless every rank holds bitwise the same tensors.

    ``named``: name -> tensor (e.g. ``model.state_dict()``), iterated in its own order,
    which must be the same on every rank. ``what`` says whose state it is in the message.
    Cost: one small all-gather per call (four int64 per tensor), whatever the tensors'
    sizes. Every rank sees the same gathered checksums, so all ranks raise together.
    """
    if not isinstance(named, Mapping):
        raise TypeError(f"check_identical: named must be a mapping name -> Tensor; got "
                        f"{type(named).__name__}")
    for k, v in named.items():
        if not isinstance(v, Tensor):
            raise TypeError(f"check_identical: {what}: {k!r} is a {type(v).__name__}, "
                            "not a Tensor")
    rank, size = world()
    if size == 1:
        return
    names = list(named)
    local = torch.zeros(1 + _FIELDS * len(names), dtype=torch.int64)
    local[0] = _layout_code(named)
    if names:
        local[1:] = torch.cat([checksum(named[k]) for k in names])
    device = _comm_device()
    # the layouts first: ranks holding different names cannot all-gather equal shapes
    heads = [torch.zeros(2, dtype=torch.int64, device=device) for _ in range(size)]
    dist.all_gather(heads, torch.tensor([local[0].item(), len(names)], dtype=torch.int64,
                                        device=device))
    head = [tuple(int(x) for x in h.tolist()) for h in heads]
    if any(h != head[0] for h in head):
        differ = [r for r in range(size) if head[r] != head[0]]
        raise StateMismatchError(
            f"{what}: the ranks hold different tensors (names, shapes or dtypes): "
            f"ranks {differ} differ from rank 0"
        )
    gathered = [torch.zeros_like(local, device=device) for _ in range(size)]
    dist.all_gather(gathered, local.to(device))
    sums = torch.stack([g.cpu() for g in gathered])[:, 1:].view(size, len(names), _FIELDS)
    bad = (sums != sums[0]).any(dim=2)  # (rank, tensor)
    if bool(bad.any()):
        first = int(bad.any(dim=0).nonzero()[0])
        differ = [r for r in range(size) if bool(bad[r, first])]
        raise StateMismatchError(
            f"{what}: {names[first]!r} differs across ranks: ranks {differ} hold other bits "
            f"than rank 0 ({int(bad.any(dim=0).sum())} of {len(names)} tensors differ); the "
            "replicas have diverged"
        )


def sync_rng_state(src: int = 0) -> None:
    """Give every rank rank ``src``'s torch CPU RNG state (and its current CUDA device's
    state when rank ``src`` has initialised CUDA), so later global-RNG draws agree."""
    size = world()[1]
    if isinstance(src, bool) or not isinstance(src, int) or not 0 <= src < size:
        raise ValueError(f"sync_rng_state: src must be a rank in [0, {size}); got {src!r}")
    if size == 1:
        return
    device = _comm_device()
    cpu = torch.get_rng_state().to(device)
    dist.broadcast(cpu, src=src)
    torch.set_rng_state(cpu.cpu())
    uses_cuda = torch.tensor([int(torch.cuda.is_available() and torch.cuda.is_initialized())],
                             device=device)
    dist.broadcast(uses_cuda, src=src)
    if int(uses_cuda.item()):
        state = torch.cuda.get_rng_state().to(device)
        dist.broadcast(state, src=src)
        torch.cuda.set_rng_state(state.cpu())


__all__ = ["StateMismatchError", "all_gather_rows", "all_reduce_sum_", "broadcast_",
           "check_identical", "checksum", "counted_rows", "is_distributed", "rows", "stand_in",
           "sync_rng_state", "world"]
