"""The BLIP strategy for one's own training loop.

```python
strategy = blip.BLIP(model, F_prior=1e-15)          # converts the trunk, heads excluded
opt = strategy.optimizer(lr=0.1)                    # fused constrained SGD
for task, (x, y) in enumerate(tasks):
    for xb, yb in batches(x, y):
        opt.zero_grad(); F.cross_entropy(model(xb, task), yb).backward()
        strategy.step(opt)                          # = opt.step() (+ project if not fused)
    strategy.end_task(task, (x, y))                 # Fisher -> bits -> sync -> running Fisher
```
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from .allocation import Allocation
from .fisher import FISHER_BATCH_SIZE, FISHER_BATCHES, estimate_fisher_
from .nn import DEFAULT_F_PRIOR, DEFAULT_MAX_BIT, convert, load_state_dict_atomic, quantized_layers
from .optim import ConstrainedSGD, project_model_

STATE_VERSION = 1


def _accepts_task(fn: Callable) -> bool:
    try:
        params = [
            p for p in inspect.signature(fn).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
    except (TypeError, ValueError):
        return False
    varargs = any(p.kind == p.VAR_POSITIONAL for p in inspect.signature(fn).parameters.values())
    return len(params) >= 2 or varargs


def used_capacity(bits_and_counts: dict[str, tuple[int, int]], max_bit: int) -> dict[str, float]:
    """Capacity per layer and ``"overall"`` from ``{layer: (sum of bits, n params)}``:
    sum of bits / (max_bit * number of quantized parameters) (docs/semantics.md, section 8)."""
    out = {k: s / (max_bit * n) if n else 0.0 for k, (s, n) in bits_and_counts.items()}
    tot_s = sum(s for s, _ in bits_and_counts.values())
    tot_n = sum(n for _, n in bits_and_counts.values())
    out["overall"] = tot_s / (max_bit * tot_n) if tot_n else 0.0
    return out


class BLIP:
    """Bit-Level Information Preserving on ``model``.

    ``model`` is converted in place (:func:`blip.convert`) except modules under
    ``exclude`` (the task heads). ``forward_mode``: ``"continuous"`` (train the fp
    weights, as the authors' code) or ``"quantized"`` (quantize-STE forward on the
    ``max_bit`` grid). ``n_batches``/``batch_size``: the Fisher sample (section 7).
    ``allocation``: an opt-in bit-allocation rule (:class:`blip.allocation.Allocation`;
    None or its defaults: the authors' rule, by the fused kernel).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        max_bit: int = DEFAULT_MAX_BIT,
        F_prior: float = DEFAULT_F_PRIOR,
        exclude: Iterable[str] | str = ("heads",),
        forward_mode: str = "continuous",
        n_batches: int = FISHER_BATCHES,
        batch_size: int = FISHER_BATCH_SIZE,
        allocation: Allocation | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module; got {type(model).__name__}")
        exclude = (exclude,) if isinstance(exclude, str) else tuple(exclude)
        converted = convert(model, exclude, max_bit=max_bit, F_prior=F_prior,
                            forward_mode=forward_mode)
        if converted is not model:
            raise TypeError("model must be a container, not a bare Linear/Conv2d: "
                            "convert it with blip.convert first")
        self.model = model
        self.layers = dict(quantized_layers(model))
        if not self.layers:
            raise ValueError(f"model has no nn.Linear/nn.Conv2d outside exclude={exclude}")
        for name, layer in self.layers.items():
            if layer.max_bit != max_bit:
                raise ValueError(f"layer {name!r} was quantized with max_bit={layer.max_bit}, "
                                 f"but max_bit={max_bit} was given")
        self.max_bit = max_bit
        self.F_prior = float(F_prior)
        self.exclude = exclude
        self.forward_mode = forward_mode
        self.n_batches = n_batches
        self.batch_size = batch_size
        if allocation is not None and not isinstance(allocation, Allocation):
            raise TypeError("allocation must be a blip.allocation.Allocation or None; got "
                            f"{type(allocation).__name__}")
        self.allocation = allocation or Allocation()
        self.tasks_seen = 0  # the t of sections 2-3: end_task calls so far

    # -- training ----------------------------------------------------------------------

    def optimizer(
        self,
        lr: float,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        params: Iterable[Tensor] | Iterable[dict] | None = None,
    ) -> ConstrainedSGD:
        """A :class:`ConstrainedSGD` over ``params`` (default: all model parameters)."""
        return ConstrainedSGD(
            self.model.parameters() if params is None else params, lr, momentum, dampening,
            weight_decay, nesterov, model=self.model,
        )

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """``optimizer.step()``, then :meth:`project` unless it is a ConstrainedSGD
        (which already projects inside its fused step)."""
        optimizer.step()
        if not isinstance(optimizer, ConstrainedSGD):
            self.project()

    def project(self) -> Tensor | None:
        """Section-4 projection after any optimizer; returns the NaN/Inf reset count (0-d)."""
        return project_model_(self.model)

    # -- end of task -------------------------------------------------------------------

    def end_task(
        self,
        task_id: int,
        data: object,
        forward: Callable[[Tensor], Tensor] | None = None,
        *,
        generator: torch.Generator | None = None,
    ) -> dict[str, Any]:
        """Fisher estimate -> bit update + running Fisher (one kernel) -> sync.

        ``data``: a DataLoader / iterable of batches, a tensor ``x`` or a tuple
        ``(x, y)`` (labels are not used: targets are sampled). ``forward(x)`` must
        return task ``task_id``'s logits; by default ``model(x, task_id)`` when the
        model's forward takes a second argument, else ``model(x)``. ``task_id`` only
        selects the head: the averaging index ``t`` is the count of earlier
        ``end_task`` calls. Returns timings, sample count and capacity.
        """
        if not isinstance(task_id, int) or task_id < 0:
            raise ValueError(f"task_id must be an int >= 0; got {task_id!r}")
        if forward is None:
            model = self.model
            forward = ((lambda x: model(x, task_id)) if _accepts_task(model.forward)
                       else (lambda x: model(x)))
        t0 = time.perf_counter()
        n = estimate_fisher_(
            self.model, list(self.layers.values()), data, forward,
            n_batches=self.n_batches, batch_size=self.batch_size, generator=generator,
        )
        t1 = time.perf_counter()
        for layer in self.layers.values():
            layer.update_bits_(self.tasks_seen, self.allocation)
            layer.sync_()
        self.tasks_seen += 1
        cap = self.capacity()
        t2 = time.perf_counter()
        return {"fisher_samples": n, "fisher_seconds": t1 - t0,
                "end_task_seconds": t2 - t0, "capacity": cap}

    # -- reporting / state -------------------------------------------------------------

    def capacity(self) -> dict[str, Any]:
        """Used capacity (section 8): ``{"overall": f, "layers": {name: f}}``,
        f = sum of bits / (max_bit * number of quantized parameters)."""
        layers = used_capacity({name: layer.capacity() for name, layer in self.layers.items()},
                               self.max_bit)
        return {"overall": layers.pop("overall"), "layers": layers}

    def config(self) -> dict[str, Any]:
        return {"max_bit": self.max_bit, "F_prior": self.F_prior, "exclude": list(self.exclude),
                "forward_mode": self.forward_mode, "n_batches": self.n_batches,
                "batch_size": self.batch_size, "allocation": self.allocation.to_dict()}

    def state_dict(self, include_model: bool = True) -> dict[str, Any]:
        """Task counter and config; plus ``model.state_dict()`` (where the BLIP buffers
        live) unless ``include_model=False`` (when the caller checkpoints the model)."""
        sd: dict[str, Any] = {"version": STATE_VERSION, "tasks_seen": self.tasks_seen,
                              "config": self.config()}
        if include_model:
            sd["model"] = self.model.state_dict()
        return sd

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or "tasks_seen" not in state:
            raise ValueError("state is not a BLIP.state_dict() (no 'tasks_seen')")
        if state.get("version", STATE_VERSION) > STATE_VERSION:
            raise ValueError(f"state version {state['version']} is newer than {STATE_VERSION}")
        cfg = state.get("config", {})
        if cfg.get("max_bit", self.max_bit) != self.max_bit:
            raise ValueError(f"state has max_bit={cfg['max_bit']}, this BLIP max_bit="
                             f"{self.max_bit}")
        tasks_seen = state["tasks_seen"]
        if not (isinstance(tasks_seen, int) and not isinstance(tasks_seen, bool)
                and tasks_seen >= 0):
            raise ValueError(f"state's tasks_seen must be an int >= 0; got {tasks_seen!r}")
        if "model" in state:  # validated as a whole, then assigned (or nothing changes)
            load_state_dict_atomic(self.model, state["model"])
        self.tasks_seen = tasks_seen


__all__ = ["BLIP", "used_capacity"]
