"""One training step of the classification trainer, run four ways, and its input batches.

- ``eager``: the method hooks in the protocol's order (``blip/methods/README.md``).
- ``off`` (the default): the fused step of :mod:`.fused_step` (no autograd, bit-identical)
  where it applies (an MLP, a method with the base per-step hooks), else ``eager``.
- ``inductor`` / ``aot_eager``: the method's loss (forward) under ``torch.compile``; its
  backward is the compiled graph AOTAutograd derives. The optimizer step stays the eager
  call: the fused BLIP update is already one custom-op call per param group, and
  ``ConstrainedSGD.step``'s per-step signature checks are Python a graph cannot keep.
- ``cudagraph``: the whole step (forward, backward, hooks, optimizer) captured once per
  (batch shape, learning rates) and replayed; inputs are copied into static buffers. On a
  CPU device the capture is a stand-in that replays the eager step, so the code path
  (warm-up, static buffers, one graph per shape, recapture after an lr change, the short
  last batch) is exercised and tested without a GPU.

Batches are gathered a chunk at a time (:func:`batches`): one index_select and one input
conversion per chunk instead of per step, and each batch is a view of the chunk.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Protocol

import torch
from torch import Tensor, nn

from ..distributed import world
from ..methods import Method, make_method
from . import ddp
from .data import TaskData
from .fused_step import FusedStep, unsupported

#: accepted values of ``TrainConfig.compile`` / ``blip train --compile``: "off" (no
#: compiler) runs the fused step where it applies (fused_step.py), else eager; "eager"
#: always runs the autograd step
COMPILE_MODES = ("off", "eager", "inductor", "aot_eager", "cudagraph")
#: bytes of float inputs gathered at once by :func:`batches`
CHUNK_BYTES = 32 << 20

Step = Callable[[Tensor, Tensor], Tensor]


def batches(task: TaskData, x: Tensor, y: Tensor, perm: Tensor, batch: int,
            chunk_bytes: int = CHUNK_BYTES) -> Iterator[tuple[Tensor, Tensor]]:
    """``(task.inputs(x[idx]), y[idx])`` for consecutive ``batch``-sized slices ``idx`` of
    ``perm``, bit-identical to gathering each batch alone (the conversion is elementwise)."""
    per_sample = max(x[0].numel(), 1) * 4  # as float32 inputs
    per_chunk = max(1, chunk_bytes // (per_sample * batch)) * batch
    for c in range(0, len(perm), per_chunk):
        idx = perm[c:c + per_chunk]
        xc, yc = task.inputs(x[idx]), y[idx]
        for i in range(0, len(idx), batch):
            yield xc[i:i + batch], yc[i:i + batch]


def _step_around(loss_fn: Step, method: Method,
                 opt: torch.optim.Optimizer, t: int) -> Step:
    # The one training step, whatever computes the loss (eager or compiled).
    def step(x: Tensor, y: Tensor) -> Tensor:
        loss = loss_fn(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        method.after_backward(t)
        opt.step()
        method.after_step(t)
        return loss

    return step


def eager_step(method: Method, net: nn.Module, opt: torch.optim.Optimizer, t: int) -> Step:
    return _step_around(lambda x, y: method.training_loss(net, x, y, t), method, opt, t)


def compiled_step(method: Method, net: nn.Module, opt: torch.optim.Optimizer, t: int,
                  backend: str) -> Step:
    import torch._dynamo

    # One graph per task (its head) and batch size (the short last batch): more than torch's
    # default of 8 recompiles, after which dynamo would silently run the rest eagerly.
    cfg = torch._dynamo.config
    cfg.recompile_limit = max(cfg.recompile_limit, 256)

    def loss_of(x: Tensor, y: Tensor) -> Tensor:
        return method.training_loss(net, x, y, t)

    return _step_around(torch.compile(loss_of, backend=backend, dynamic=False), method, opt, t)


class Capture(Protocol):
    """A recorded piece of work: ``capture(fn)`` records it (running nothing), ``replay()``
    runs it again."""

    def capture(self, fn: Callable[[], None]) -> None: ...
    def replay(self) -> None: ...


class CudaCapture:
    def __init__(self) -> None:
        self.graph = torch.cuda.CUDAGraph()

    def capture(self, fn: Callable[[], None]) -> None:
        with torch.cuda.graph(self.graph):
            fn()

    def replay(self) -> None:
        self.graph.replay()


class EagerCapture:
    """The CPU stand-in for a CUDA graph: records the function, replays it eagerly."""

    def __init__(self) -> None:
        self.fn: Callable[[], None] | None = None

    def capture(self, fn: Callable[[], None]) -> None:
        self.fn = fn

    def replay(self) -> None:
        if self.fn is None:
            raise RuntimeError("replay() before capture()")
        self.fn()


def check_capturable(method: type[Method]) -> None:
    """A graph records the step's device work once; a method whose own per-step hooks
    (loss, after_backward, after_step) may do host-side work (sampling, Python state) would
    have it frozen at capture, so only methods using the base hooks are captured."""
    own = [h for h in ("training_loss", "after_backward", "after_step")
           if getattr(method, h) is not getattr(Method, h)]
    if own:
        raise ValueError(f"compile='cudagraph': method {method.name!r} has its own per-step "
                         f"hooks ({', '.join(own)}), which a captured graph would freeze; use "
                         f"compile='inductor' or 'off' for it")


class GraphStep:
    """The whole step as a captured graph, one per (input shapes, learning rates).

    The first batch of a shape runs eagerly (on a side stream on CUDA): it allocates the
    optimizer state and passes the optimizer's first-step checks, which sync and so cannot
    be captured. The next batch of that shape is captured (nothing runs while capturing)
    and replayed. Learning rates are baked into the captured launches, so an lr change
    drops the graphs. Each graph keeps its gradients allocated, so two graphs (the full
    and the short last batch) never share them. ``captures`` counts the captures.
    """

    def __init__(self, method: Method, net: nn.Module, opt: torch.optim.Optimizer, t: int,
                 device: torch.device) -> None:
        check_capturable(type(method))
        self.eager = eager_step(method, net, opt, t)
        self.net, self.opt, self.device = net, opt, device
        self.graphs: dict[tuple, tuple[Capture, Tensor, Tensor, dict[str, Tensor], list]] = {}
        self.warm: set[tuple] = set()
        self.lrs: tuple[float, ...] | None = None
        self.captures = 0
        # ConstrainedSGD appends a per-step count of skipped NaN/Inf gradient elements; in a
        # graph that count is one static tensor overwritten by every replay, so the captured
        # step moves it into a running total (``_totals``) handed back by finish().
        self._totals: list[Tensor] = []

    def _new_capture(self) -> Capture:
        return CudaCapture() if self.device.type == "cuda" else EagerCapture()

    def __call__(self, x: Tensor, y: Tensor) -> Tensor:
        lrs = tuple(float(g["lr"]) for g in self.opt.param_groups)
        if lrs != self.lrs:
            self.graphs.clear()
            self.lrs = lrs
        key = (tuple(x.shape), x.dtype, tuple(y.shape), y.dtype)
        entry = self.graphs.get(key)
        if entry is None:
            if key not in self.warm:
                self.warm.add(key)
                return self._warm_up(x, y)
            entry = self.graphs[key] = self._capture(x, y)
        graph, xs, ys, out, _ = entry
        xs.copy_(x)
        ys.copy_(y)
        graph.replay()
        return out["loss"]

    def _warm_up(self, x: Tensor, y: Tensor) -> Tensor:
        if self.device.type != "cuda":
            return self.eager(x, y)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            loss = self.eager(x, y)
        torch.cuda.current_stream(self.device).wait_stream(side)
        return loss

    def _capture(self, x: Tensor, y: Tensor
                 ) -> tuple[Capture, Tensor, Tensor, dict[str, Tensor], list]:
        xs, ys = x.clone(), y.clone()
        out: dict[str, Tensor] = {}
        skipped = getattr(self.opt, "_skipped", None)
        total = torch.zeros((), dtype=torch.int64, device=self.device)

        def body() -> None:
            n = len(skipped) if isinstance(skipped, list) else 0
            out["loss"] = self.eager(xs, ys)
            if isinstance(skipped, list) and len(skipped) > n:
                for c in skipped[n:]:
                    total.add_(c.to(total.device))
                del skipped[n:]

        graph = self._new_capture()
        graph.capture(body)
        self.captures += 1
        self._totals.append(total)
        # the graph's own gradient tensors stay alive while it may replay
        keep = [p.grad for p in self.net.parameters()]
        return graph, xs, ys, out, keep

    def flush(self) -> None:
        """The graphs' skipped-element totals so far go to the optimizer (end of an epoch:
        its ``skipped_nonfinite()`` is then as in eager, e.g. for the NaN stop)."""
        add = getattr(self.opt, "_add_skipped", None)
        if add is not None:
            for total in self._totals:
                add(total.clone())
                total.zero_()  # outside the graph; its captured add_ keeps accumulating here

    def finish(self) -> None:
        """End of the task: flush, then drop the graphs."""
        self.flush()
        self._totals.clear()
        self.graphs.clear()


def make_step(mode: str, method: Method, net: nn.Module, opt: torch.optim.Optimizer, t: int,
              device: torch.device) -> Step | GraphStep:
    if world()[1] > 1:  # each rank its rows of the batch, gradients through DDP (ddp.py)
        if mode not in ("off", "eager"):
            raise ValueError(f"compile={mode!r} is not supported on several ranks; use 'off'")
        return _step_around(ddp.sharded_loss(method, net, t, device), method, opt, t)
    if mode == "off" and unsupported(method, net, t) is None:
        return FusedStep(method, net, opt, t)
    if mode in ("off", "eager"):
        return eager_step(method, net, opt, t)
    if mode in ("inductor", "aot_eager"):
        return compiled_step(method, net, opt, t, mode)
    if mode == "cudagraph":
        return GraphStep(method, net, opt, t, device)
    raise ValueError(f"compile must be one of {', '.join(COMPILE_MODES)}; got {mode!r}")


def warm_up(method_name: str, hparams: dict, device: torch.device) -> None:
    """The one-time costs of a first training step, paid on a throwaway 2-2 MLP before any
    task's clock starts: lazy imports (torch's optimizers import torch._dynamo on first
    use), the kernel backend's first calls, the autograd engine. Uses the global RNG: call
    it before the run seeds and builds its model."""
    from ..models import MLP

    method = make_method(method_name, MLP(2, 2, [2]), **hparams)
    net = method.prepare().to(device)
    method.before_task(0)
    opt = method.make_optimizer(0, 1e-3)
    x, y = torch.zeros(4, 2, device=device), torch.zeros(4, dtype=torch.long, device=device)
    net.train()
    step = eager_step(method, net, opt, 0)
    for _ in range(2):
        step(x, y)
    method.after_task(0, x, y)
    net.eval()
    with torch.no_grad(), method.eval_context(0):
        net(x, 0)


__all__ = ["CHUNK_BYTES", "COMPILE_MODES", "Capture", "CudaCapture", "EagerCapture",
           "GraphStep", "batches", "check_capturable", "compiled_step", "eager_step",
           "make_step", "warm_up"]
