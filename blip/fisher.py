"""True-Fisher estimation at the end of a task (docs/semantics.md, section 7).

Convention (the one the published ``F_prior`` values assume):

* targets are *sampled* from the model's own categorical over the task head's
  logits (true Fisher, not the empirical one);
* the loss is the batch mean, so each per-sample gradient carries ``1/batch_size``;
* squared per-sample gradients are summed over all samples, then divided by the
  number of samples.

The per-sample squares come from :func:`blip_kernels.fisher_linear_` /
:func:`blip_kernels.fisher_conv2d_`, fed by hooks that keep each layer's input
and the loss gradient w.r.t. its output; no per-sample gradient is ever held
here. :func:`estimate_fisher_` fills BLIP's quantized layers' accumulators;
:func:`true_fisher` returns the same estimate for any ``nn.Linear`` /
``nn.Conv2d`` (quantized or not) as plain tensors, for the Fisher-based
baselines (EWC, online EWC, IMM).

Mode: the model runs in **eval** mode during estimation, as in the authors'
code. It also makes per-sample gradients well defined: in train mode BatchNorm
couples the samples of a batch and dropout adds noise to the estimate. The
previous train/eval flags are restored afterwards.

Batching: samples are re-batched to ``batch_size`` whatever the input batching
(the last batch may be short), and the loss is the mean over each actual batch,
as the authors' loop computes it.

Several ranks (torch.distributed initialised, world size > 1): every rank must pass the
same data and an identically seeded generator, so all draw the same global batches; each
forwards its :func:`blip.distributed.rows` of every batch, the targets are sampled for the
whole batch from the gathered logits (the same draw as one process), and the accumulators
are summed over ranks once at the end, then divided by the global sample count. Run it on
the unwrapped model (never a DistributedDataParallel), so DDP's gradient hooks stay out of
it. At world size 1 the single-process code path runs unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import blip_kernels

from . import distributed
from .modes import module_modes, restore_modes
from .nn import QuantConv2d, QuantLinear

#: the published Fisher budget (docs/semantics.md, section 7): at most this many batches of
FISHER_BATCHES = 80
#: this many samples (the loss is each batch's mean)
FISHER_BATCH_SIZE = 100

Layer = QuantLinear | QuantConv2d
AnyLayer = nn.Linear | nn.Conv2d
#: per layer id: (weight accumulator, bias accumulator or None)
Accumulators = dict[int, tuple[Tensor, Tensor | None]]
Forward = Callable[[Tensor], Tensor]


def _first_tensor(batch: object) -> Tensor:
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        return batch[0]
    if isinstance(batch, dict) and isinstance(batch.get("x"), Tensor):
        return batch["x"]
    raise TypeError(
        "data: each batch must be a Tensor, a (x, y, ...) tuple/list or a dict with 'x'; "
        f"got {type(batch).__name__}"
    )


def iter_fisher_batches(
    data: object,
    n_batches: int = FISHER_BATCHES,
    batch_size: int = FISHER_BATCH_SIZE,
    generator: torch.Generator | None = None,
) -> Iterator[Tensor]:
    """Input batches of exactly ``batch_size`` (the last may be short), at most ``n_batches``.

    ``data``: a Tensor ``x``; a *tuple* of tensors ``(x, y, ...)`` with a common first
    dimension (a dataset: a random subset is drawn with ``generator``, as the authors
    shuffle); or any iterable of batches (DataLoader, list of ``(x, y)``...), consumed
    in order until enough samples were seen.
    """
    if not isinstance(n_batches, int) or n_batches < 1:
        raise ValueError(f"n_batches must be an int >= 1; got {n_batches!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1; got {batch_size!r}")
    limit = n_batches * batch_size
    if isinstance(data, tuple) and data and all(isinstance(t, Tensor) for t in data):
        data = data[0]
    if isinstance(data, Tensor):
        if data.dim() == 0 or data.shape[0] == 0:
            raise ValueError(f"data holds no samples (shape {tuple(data.shape)})")
        gen_device = generator.device if generator is not None else torch.device("cpu")
        order = torch.randperm(data.shape[0], generator=generator, device=gen_device)[:limit]
        order = order.to(data.device)
        for s in range(0, order.numel(), batch_size):
            yield data[order[s : s + batch_size]]
        return
    if not isinstance(data, Iterable):
        raise TypeError(f"data must be a Tensor, a tuple of tensors or an iterable of batches; "
                        f"got {type(data).__name__}")
    pending: list[Tensor] = []
    have = seen = 0
    for batch in data:
        x = _first_tensor(batch)
        x = x[: limit - seen]
        pending.append(x)
        have += x.shape[0]
        seen += x.shape[0]
        while have >= batch_size:
            cat = torch.cat(pending) if len(pending) > 1 else pending[0]
            yield cat[:batch_size]
            rest = cat[batch_size:]
            pending, have = ([rest], rest.shape[0]) if rest.shape[0] else ([], 0)
        if seen >= limit:
            break
    if have:
        yield torch.cat(pending)
    if seen == 0:
        raise ValueError("data yielded no samples")


class _Recorder:
    """Forward hooks that keep each layer's input and hook its output's gradient."""

    def __init__(self, layers: Sequence[AnyLayer], accs: Accumulators) -> None:
        self.calls: dict[int, int] = {}
        self.accs = accs
        self.handles = [layer.register_forward_hook(self._hook) for layer in layers]
        self.names = {id(layer): type(layer).__name__ for layer in layers}

    def _hook(self, layer: nn.Module, inputs: tuple, output: Tensor) -> None:
        if not torch.is_grad_enabled():
            return
        # keyed by the weight: layers sharing it (convert keeps ties) count as one
        n = self.calls.get(id(layer.weight), 0) + 1
        self.calls[id(layer.weight)] = n
        if n > 1:
            # Σ_n (Σ_uses g)^2 does not split into per-use squares.
            raise ValueError(
                f"a {self.names[id(layer)]} (or a layer sharing its weight) was called more "
                "than once in one forward; the Fisher of a layer shared within a forward "
                "is not supported"
            )
        x = inputs[0].detach()
        # A tensor hook registered now sees the gradient of this output even if a
        # later op (ReLU(inplace=True)) modifies it in place.
        fw, fb = self.accs[id(layer)]
        output.register_hook(lambda g: _accumulate(layer, fw, fb, x, g))

    def new_batch(self) -> None:
        self.calls.clear()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _accumulate(layer: nn.Module, fw: Tensor, fb: Tensor | None, x: Tensor, g: Tensor) -> None:
    if isinstance(layer, nn.Linear):
        if x.dim() == 1:  # unbatched call: one sample
            x, g = x.unsqueeze(0), g.unsqueeze(0)
        elif x.dim() > 3:  # (N, *, in): per-sample gradients sum over all middle axes
            x, g = x.flatten(1, -2), g.flatten(1, -2)
        blip_kernels.fisher_linear_(fw, fb, x, g.detach())
        return
    if x.dim() == 3:
        x, g = x.unsqueeze(0), g.unsqueeze(0)
    padding = layer.padding
    if isinstance(padding, str) or layer.padding_mode != "zeros":
        # Pad as the layer's forward does ('same' may be asymmetric, or a non-zero
        # padding mode), then run the kernel unpadded.
        mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
        x = F.pad(x, layer._reversed_padding_repeated_twice, mode=mode)
        padding = (0, 0)
    blip_kernels.fisher_conv2d_(
        fw, fb, x, g.detach(), layer.stride, padding, layer.dilation, layer.groups
    )


def _sample_targets(logits: Tensor, generator: torch.Generator | None) -> Tensor:
    probs = F.softmax(logits.detach().float(), dim=-1)
    if generator is not None and generator.device != probs.device:
        return torch.multinomial(probs.to(generator.device), 1, generator=generator).squeeze(
            -1).to(logits.device)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _check_forward(forward: object) -> None:
    if not callable(forward):
        raise TypeError(f"forward must be callable x -> logits; got {type(forward).__name__}")


def _accumulate_true_fisher(
    model: nn.Module,
    layer_list: Sequence[AnyLayer],
    accs: Accumulators,
    batches: object,
    forward: Forward,
    n_batches: int,
    batch_size: int,
    generator: torch.Generator | None,
) -> int:
    """Add ``Σ_n g_n²`` (batch-mean loss, sampled targets) of every layer into ``accs``;
    returns the number of samples (the caller divides by it)."""
    modes = module_modes(model)
    grad_flags = {id(p): (p, p.requires_grad) for lay in layer_list for p in lay.parameters()}
    weights = [lay.weight for lay in layer_list]
    device = weights[0].device
    recorder = _Recorder(layer_list, accs)
    n = 0
    try:
        model.eval()
        for p, _ in grad_flags.values():
            p.requires_grad_(True)  # so every hooked output is part of the graph
        sharded = distributed.is_distributed()
        with torch.enable_grad():
            for x in iter_fisher_batches(batches, n_batches, batch_size, generator):
                x = x.to(device, non_blocking=True)  # loaders often yield CPU batches
                recorder.new_batch()
                if sharded:
                    loss = _shard_loss(x, forward, generator)
                else:
                    logits = _checked_logits(forward(x), x.shape[0])
                    _check_finite(logits)
                    y = _sample_targets(logits, generator)
                    loss = F.cross_entropy(logits.float(), y)  # the batch mean (section 7)
                # Gradients w.r.t. the weights are only a way to drive the backward
                # through every hooked output; they are discarded (no .grad pollution).
                torch.autograd.grad(loss, weights, allow_unused=True)
                n += x.shape[0]
        if sharded:  # each rank summed its rows' squares: one sum over ranks, then / n
            distributed.all_reduce_sum_(_unique_tensors(accs))
    finally:
        recorder.remove()
        for p, flag in grad_flags.values():
            p.requires_grad_(flag)
        restore_modes(modes)
    return n


def _checked_logits(logits: Tensor, n: int) -> Tensor:
    if logits.dim() != 2 or logits.shape[0] != n:
        raise ValueError(
            f"forward must return logits of shape (N={n}, classes); got {tuple(logits.shape)}"
        )
    return logits


def _check_finite(logits: Tensor) -> None:
    if not torch.isfinite(logits).all():
        raise FloatingPointError(
            "forward returned NaN/Inf logits while estimating the Fisher: the "
            "model or the task's data is not finite"
        )


def _shard_loss(x: Tensor, forward: Forward, generator: torch.Generator | None) -> Tensor:
    """This rank's part of one global Fisher batch ``x`` (the same on every rank): its
    :func:`distributed.rows` are forwarded, the logits of all ranks gathered so the targets
    are sampled for the whole batch by the same generator call as in one process, and the
    loss is this rank's share of the batch mean (sum over its rows / global batch size), so
    the per-sample gradients, hence the squares the hooks add, are the single-process ones.
    A rank whose share is empty (a short last batch) forwards one row with weight 0."""
    share = distributed.rows(x.shape[0])
    empty = share.stop == share.start
    mine = x[:1] if empty else x[share]
    logits = _checked_logits(forward(mine), mine.shape[0])
    full = distributed.all_gather_rows(logits[:0] if empty else logits.detach())
    _check_finite(full)  # on the gathered logits: every rank raises together
    y = _sample_targets(full, generator)
    if empty:
        return F.cross_entropy(logits.float(), y[:1], reduction="sum") * 0.0
    return F.cross_entropy(logits.float(), y[share], reduction="sum") / x.shape[0]


def _unique_tensors(accs: Accumulators) -> list[Tensor]:
    """The accumulators, each once (layers sharing a weight share its accumulator)."""
    seen: dict[int, Tensor] = {}
    for pair in accs.values():
        for t in pair:
            if t is not None:
                seen.setdefault(id(t), t)
    return list(seen.values())


def estimate_fisher_(
    model: nn.Module,
    layers: Iterable[Layer] | Iterable[tuple[str, Layer]],
    batches: object,
    forward: Forward,
    *,
    n_batches: int = FISHER_BATCHES,
    batch_size: int = FISHER_BATCH_SIZE,
    generator: torch.Generator | None = None,
) -> int:
    """Fill each layer's Fisher accumulator with this task's true-Fisher diagonal.

    ``layers``: quantized layers (or ``(name, layer)`` pairs, as from
    :func:`blip.nn.quantized_layers`); their accumulators are allocated (zeroed)
    here and consumed by ``layer.update_bits_``. ``batches``: see
    :func:`iter_fisher_batches`. ``forward(x)`` returns the task head's logits
    ``(N, classes)``. ``generator`` drives the subset draw and the target sampling.
    Returns the number of samples used.
    """
    layer_list: list[Layer] = []
    for item in layers:
        layer = item[1] if isinstance(item, tuple) else item
        if not isinstance(layer, (QuantLinear, QuantConv2d)):
            raise TypeError(f"layers must hold QuantLinear/QuantConv2d; got {type(layer).__name__}")
        layer_list.append(layer)
    if not layer_list:
        raise ValueError("layers is empty: nothing to estimate a Fisher for")
    _check_forward(forward)

    for lay in layer_list:
        lay.free_fisher_()
        lay.alloc_fisher_()
    # a layer sharing a parameter with another adds to that layer's accumulator
    accs: Accumulators = {id(lay): lay.fisher_accumulators() for lay in layer_list}
    try:
        n = _accumulate_true_fisher(model, layer_list, accs, batches, forward, n_batches,
                                    batch_size, generator)
        for lay in layer_list:
            for name in lay.blip_param_names():
                getattr(lay, f"fisher_{name}").mul_(1.0 / n)
    except BaseException:
        for lay in layer_list:
            lay.free_fisher_()
        raise
    return n


def true_fisher(
    model: nn.Module,
    layers: Iterable[tuple[str, AnyLayer]],
    batches: object,
    forward: Forward,
    *,
    n_batches: int = FISHER_BATCHES,
    batch_size: int = FISHER_BATCH_SIZE,
    generator: torch.Generator | None = None,
) -> tuple[dict[str, Tensor], int]:
    """The true-Fisher diagonal of any ``nn.Linear`` / ``nn.Conv2d`` layers, as tensors.

    Same convention and kernels as :func:`estimate_fisher_` (section 7), but the
    layers need no BLIP buffers and nothing is stored on them. ``layers``:
    ``(name, layer)`` pairs, e.g. from ``model.named_modules()``. Returns
    ``({f"{name}.weight": F_w, f"{name}.bias": F_b, ...}, n_samples)``, fp32, on the
    layers' device; the keys match ``model.named_parameters()`` when the names come
    from ``model.named_modules()``.
    """
    pairs: list[tuple[str, AnyLayer]] = []
    for item in layers:
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)):
            raise TypeError(f"layers must hold (name, layer) pairs; got {item!r}")
        if not isinstance(item[1], (nn.Linear, nn.Conv2d)):
            raise TypeError(f"layers must hold nn.Linear/nn.Conv2d (or their quantized "
                            f"subclasses); got {type(item[1]).__name__} for {item[0]!r}")
        pairs.append(item)
    if not pairs:
        raise ValueError("layers is empty: nothing to estimate a Fisher for")
    _check_forward(forward)
    accs: Accumulators = {}
    for _, lay in pairs:
        fw = torch.zeros(lay.weight.shape, dtype=torch.float32, device=lay.weight.device)
        fb = (torch.zeros(lay.bias.shape, dtype=torch.float32, device=lay.bias.device)
              if lay.bias is not None else None)
        accs[id(lay)] = (fw, fb)
    n = _accumulate_true_fisher(model, [lay for _, lay in pairs], accs, batches, forward,
                                n_batches, batch_size, generator)
    out: dict[str, Tensor] = {}
    for name, lay in pairs:
        fw, fb = accs[id(lay)]
        prefix = f"{name}." if name else ""
        out[prefix + "weight"] = fw.mul_(1.0 / n)
        if fb is not None:
            out[prefix + "bias"] = fb.mul_(1.0 / n)
    return out, n


__all__ = ["estimate_fisher_", "iter_fisher_batches", "true_fisher"]
