"""SGD fused with the BLIP bit constraint, and the projection for any other optimizer."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn
from torch.optim import optimizer as _torch_optimizer
from torch.optim.sgd import sgd  # torch's functional SGD: the same math as SGD.step

import blip_kernels

from . import validate
from .nn import quantized_layers


def _constraint_map(model: nn.Module) -> dict[Tensor, tuple[nn.Module, str, str]]:
    # Keyed by the Parameter object (tensors hash by identity). The buffers are
    # read at step time through the layer, so .to()/load_state_dict stay safe.
    found: dict[Tensor, tuple[nn.Module, str, str]] = {}
    for lname, layer in quantized_layers(model):
        for name in layer.blip_param_names():
            found[getattr(layer, name)] = (layer, name, f"{lname}.{name}" if lname else name)
    return found


def _check_buffers(name: str, p: Tensor, prev: Tensor, bits: Tensor) -> None:
    """A clear error naming the parameter before the kernel would read out of bounds."""
    if not (p.shape == prev.shape == bits.shape):
        raise ValueError(
            f"ConstrainedSGD: parameter {name!r} has shape {tuple(p.shape)} but its BLIP "
            f"buffers prev/bits have {tuple(prev.shape)}/{tuple(bits.shape)} (was its .data "
            f"replaced?); convert the model again (blip.convert) and build a new optimizer")
    if not (p.device == prev.device == bits.device):
        raise ValueError(f"ConstrainedSGD: parameter {name!r} is on {p.device} but its BLIP "
                         f"buffers are on {prev.device}/{bits.device}; move the whole model")
    if prev.dtype != torch.float32 or bits.dtype != torch.uint8 or not p.is_floating_point():
        raise ValueError(f"ConstrainedSGD: parameter {name!r} ({p.dtype}) needs fp32 prev and "
                         f"uint8 bits buffers; got {prev.dtype}/{bits.dtype}")


def _check_step_tensors(name: str, p: Tensor, grad: Tensor, buf: Tensor | None) -> None:
    """The gradient and momentum buffer of ``p`` fit it (the kernels index all of them
    with p's size): a ``.grad.data = ...`` or a swapped buffer is a clear error."""
    for what, t, dtype in (("gradient", grad, p.dtype), ("momentum buffer", buf, torch.float32)):
        if t is None:
            continue
        if t.shape != p.shape or t.dtype != dtype or t.device != p.device \
                or t.layout != torch.strided:
            raise ValueError(
                f"ConstrainedSGD: the {what} of parameter {name!r} is {tuple(t.shape)} "
                f"{str(t.dtype).replace('torch.', '')} on {t.device}; it must be "
                f"{tuple(p.shape)} {str(dtype).replace('torch.', '')} on {p.device} like "
                f"the parameter")


_UNPLANNED = object()  # a parameter _targets has not seen yet


class _Call:
    """The constrained parameters of one foreach call (one max_bit, one device)."""

    __slots__ = ("bits", "bounds", "bufs", "damps", "grads", "prevs", "unchecked", "ws")

    def __init__(self, dampening: float) -> None:
        self.ws: list[Tensor] = []
        self.grads: list[Tensor] = []
        self.prevs: list[Tensor] = []
        self.bits: list[Tensor] = []
        self.bounds: list[float] = []
        self.bufs: list[Tensor] = []
        self.damps: list[float] | float = dampening  # a list once some buffer is new
        # first step, or changed since the last check: (parameter, (signature, storages))
        self.unchecked: list[tuple[Tensor, tuple]] = []

    def add(self, p: Tensor, grad: Tensor, prev: Tensor, bits: Tensor, bound: float) -> None:
        self.ws.append(p)
        self.grads.append(grad)
        self.prevs.append(prev)
        self.bits.append(bits)
        self.bounds.append(bound)

    def add_momentum_buffer(self, state: dict, p: Tensor, dampening: float) -> Tensor:
        buf = state.get("momentum_buffer")
        if buf is None:
            # torch's first step sets buf = g; 0·momentum + (1-0)·g is exactly g.
            buf = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)
            state["momentum_buffer"] = buf
            if not isinstance(self.damps, list):
                self.damps = [dampening] * len(self.ws)
            self.damps.append(0.0)
        else:
            if buf.dtype != torch.float32:  # Optimizer.load_state_dict casts to p.dtype
                buf = buf.float()
                state["momentum_buffer"] = buf
            if isinstance(self.damps, list):
                self.damps.append(dampening)
        self.bufs.append(buf)
        return buf


class ConstrainedSGD(torch.optim.Optimizer):
    """``torch.optim.SGD`` whose step on BLIP-constrained parameters is fused with the
    section-4 projection (:func:`blip_kernels.constrained_sgd_step_foreach_`, one
    call per param group).

    Parameters of quantized layers (found through ``model``) get the fused kernel;
    all others (task heads, norms) get plain SGD math, identical to torch's. The
    momentum buffer of a constrained parameter is fp32. A NaN/Inf gradient element
    of a constrained parameter is skipped and counted (:meth:`skipped_nonfinite`);
    plain parameters behave as torch's SGD does (no skipping).

    ``params`` may be the model itself (then ``model`` defaults to it) or any
    iterable of parameters / param groups, in which case ``model`` is required.
    """

    def __init__(
        self,
        params: nn.Module | Iterable[Tensor] | Iterable[dict],
        lr: float,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        model: nn.Module | None = None,
    ) -> None:
        if isinstance(params, nn.Module):
            model = params if model is None else model
            params = params.parameters()
        if model is None:
            raise TypeError("model is required (to find the BLIP constraints) unless params "
                            "is the model itself")
        # finite in float32 (the kernels' precision), bools refused: blip.validate
        validate.number("lr", lr, lo=0.0)
        validate.number("momentum", momentum, lo=0.0, hi=1.0, hi_open=True)
        validate.number("dampening", dampening, lo=0.0, hi=1.0)
        validate.number("weight_decay", weight_decay, lo=0.0)
        if not isinstance(nesterov, bool):
            raise ValueError(f"nesterov must be True or False; got {nesterov!r}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("nesterov requires momentum > 0 and dampening == 0")
        defaults = {"lr": lr, "momentum": momentum, "dampening": dampening,
                    "weight_decay": weight_decay, "nesterov": nesterov}
        super().__init__(params, defaults)
        self._constraints = _constraint_map(model)
        self._plans: dict[Tensor, tuple[dict, str, str, float, int, str] | None] = {}
        # parameter -> (signature: addresses and shapes, storages, dtype, device) at its last
        # full validation. Holding the storages keeps their addresses from being reused by a
        # later allocation, so a changed buffer always shows as a changed address.
        self._checked: dict[Tensor, tuple] = {}
        self._skipped: list[Tensor] = []

    @staticmethod
    def profile_hook_step(func: Callable) -> Callable:
        """torch's ``step`` wrapper (profiler label, step pre/post hooks), entered only
        when a profiler runs or a hook is registered. Its ``record_function`` costs
        ~30 µs per step even with nothing listening: on a small model, more than the
        whole fused update."""
        hooked = torch.optim.Optimizer.profile_hook_step(func)

        @functools.wraps(func)
        def step(self: ConstrainedSGD, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            if (self._optimizer_step_pre_hooks or self._optimizer_step_post_hooks
                    or _torch_optimizer._global_optimizer_pre_hooks
                    or _torch_optimizer._global_optimizer_post_hooks
                    or torch.autograd._profiler_enabled()):
                return hooked(self, *args, **kwargs)
            return func(self, *args, **kwargs)

        return step

    # -- entry points without torch's per-call wrappers ---------------------------------
    # torch decorates Optimizer.zero_grad and add_param_group with _disable_dynamo (its first
    # call imports torch._dynamo: 1.4-2.7 s here, counted inside task 0) and wraps zero_grad's
    # loop in a profiler record_function (~15-30 µs per step with nothing listening).

    def add_param_group(self, param_group: dict) -> None:
        # torch's own body, without the decorator that imports torch._dynamo (functools.wraps
        # keeps it as __wrapped__; a torch without the decorator has the body itself)
        body = torch.optim.Optimizer.add_param_group
        getattr(body, "__wrapped__", body)(self, param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        if torch.autograd._profiler_enabled():  # a profiler listens: torch's, with its label
            return torch.optim.Optimizer.zero_grad(self, set_to_none)
        for group in self.param_groups:
            for p in group["params"]:
                grad = p.grad
                if grad is None:
                    continue
                if set_to_none:
                    p.grad = None
                else:  # as torch's (non-foreach) zero_grad
                    if grad.grad_fn is not None:
                        grad.detach_()
                    else:
                        grad.requires_grad_(False)
                    grad.zero_()
        return None

    def _add_skipped(self, count: Tensor) -> None:
        # Kept as a list and folded now and then: an add per step would cost a kernel launch.
        self._skipped.append(count)
        if len(self._skipped) >= 256:
            self._fold_skipped()

    def _fold_skipped(self) -> None:
        by_device: dict[torch.device, Tensor] = {}
        for c in self._skipped:
            by_device[c.device] = by_device[c.device] + c if c.device in by_device else c
        self._skipped = list(by_device.values())

    def skipped_nonfinite(self) -> int:
        """Elements skipped for a NaN/Inf gradient since construction (one sync)."""
        self._fold_skipped()
        return sum(int(t) for t in self._skipped)

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's load, after checking every momentum buffer against its parameter (torch
        casts dtype and device but not shape; a buffer of another model's size would be
        indexed with this parameter's). Nothing is assigned if a buffer is refused."""
        groups, state = state_dict.get("param_groups"), state_dict.get("state")
        if isinstance(groups, list) and isinstance(state, dict) \
                and len(groups) == len(self.param_groups):
            names = {p: q for p, (_, _, q) in self._constraints.items()}
            for saved, group in zip(groups, self.param_groups, strict=True):
                ids = saved.get("params") if isinstance(saved, dict) else None
                if not isinstance(ids, list) or len(ids) != len(group["params"]):
                    break  # torch's own load says what is wrong
                for pid, p in zip(ids, group["params"], strict=True):
                    entry = state.get(pid)
                    buf = entry.get("momentum_buffer") if isinstance(entry, dict) else None
                    if buf is None:
                        continue
                    name = names.get(p, f"#{pid}")
                    if not isinstance(buf, Tensor) or buf.layout != torch.strided \
                            or not buf.is_floating_point() or buf.shape != p.shape:
                        got = (f"{tuple(buf.shape)} {buf.dtype}" if isinstance(buf, Tensor)
                               else type(buf).__name__)
                        raise ValueError(
                            f"ConstrainedSGD.load_state_dict: the momentum buffer of parameter "
                            f"{name!r} is {got}; it must be a floating tensor of the "
                            f"parameter's shape {tuple(p.shape)} (a state of another model?)")
        super().load_state_dict(state_dict)

    def step(self, closure=None):  # noqa: ANN001, ANN201 - torch's signature
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # As torch.no_grad(), without the ~3 µs per step of its decorator.
        prev = torch.is_grad_enabled()
        torch._C._set_grad_enabled(False)
        try:
            for group in self.param_groups:
                self._step_group(group)
        finally:
            torch._C._set_grad_enabled(prev)
        return loss

    def _targets(self, p: Tensor) -> tuple[dict, str, str, float, int, str] | None:
        """Where p's BLIP state lives: (layer buffers, prev key, bits key, bound, max_bit,
        qualified name).

        Cached per parameter so a step does dict reads only (Module.__getattr__, the
        f-strings and bound_of cost more Python time than a small layer's kernel). The
        buffers dict itself is kept, so buffers replaced by .to() are still found.
        """
        cached = self._plans.get(p)
        if cached is None and p not in self._plans:
            target = self._constraints.get(p)
            if target is not None:
                layer, name, qualified = target
                cached = (layer._buffers, f"prev_{name}", f"bits_{name}", layer.bound_of(name),
                          layer.max_bit, qualified)
            self._plans[p] = cached
        return cached

    def _step_group(self, group: dict) -> None:
        lr = float(group["lr"])
        momentum, dampening = float(group["momentum"]), float(group["dampening"])
        wd, nesterov = float(group["weight_decay"]), bool(group["nesterov"])
        plain, plain_grads, calls = self._init_group(group, momentum, dampening)
        for (max_bit, _), call in calls.items():
            self._constrained_step(call, max_bit, lr, momentum, nesterov, wd)
        if plain:
            self._plain_sgd(plain, plain_grads, lr, momentum, dampening, wd, nesterov)

    def _init_group(self, group: dict, momentum: float, dampening: float
                    ) -> tuple[list[Tensor], list[Tensor], dict[tuple[int, torch.device], _Call]]:
        """The group's parameters with a gradient: the plain ones (and their gradients), and
        the constrained ones by (max_bit, device), each set one foreach call (a native call
        per parameter costs more Python time than its kernel on small layers)."""
        plain: list[Tensor] = []
        plain_grads: list[Tensor] = []
        calls: dict[tuple[int, torch.device], _Call] = {}
        plans, checked = self._plans, self._checked  # locals: this loop runs every step
        for p in group["params"]:
            grad = p.grad
            if grad is None:
                continue
            if grad.is_sparse:
                raise RuntimeError("ConstrainedSGD does not support sparse gradients")
            target = plans.get(p, _UNPLANNED)
            if target is _UNPLANNED:
                target = self._targets(p)
            if target is None:
                plain.append(p)
                plain_grads.append(grad)
                continue
            buffers, prev_key, bits_key, bound, max_bit, qualified = target
            key = (max_bit, p.device)
            call = calls.get(key)
            if call is None:
                call = calls[key] = _Call(dampening)
            buf = call.add_momentum_buffer(self.state[p], p, dampening) if momentum else None
            # The first step of a parameter (in this optimizer object) checks everything,
            # bits <= max_bit included; later ones only compare a signature of what the
            # kernels rely on and a user can change between steps (p.data = ..., layer.to(),
            # a buffer swapped or sliced, a momentum buffer replaced): addresses and sizes
            # (a new dtype or device means new storage, hence a new address, as the storages
            # checked last are held). Inline: ~1 µs a parameter. So a changed parameter or
            # buffer is re-validated (bits <= max_bit too, in _constrained_step) and a misfit
            # is a clear error, not an out-of-bounds access. Bits only change in place
            # through update_bits_, which caps them, and load_state_dict, which checks them.
            prev_t, bits_t = buffers[prev_key], buffers[bits_key]
            shape = p.shape
            sig = (p.data_ptr(), prev_t.data_ptr(), bits_t.data_ptr(), shape, prev_t.shape,
                   bits_t.shape) if buf is None else (
                p.data_ptr(), prev_t.data_ptr(), bits_t.data_ptr(), shape, prev_t.shape,
                bits_t.shape, buf.data_ptr(), buf.shape)
            last = checked.get(p)
            if last is None or last[0] != sig:
                _check_buffers(qualified, p, prev_t, bits_t)
                _check_step_tensors(qualified, p, grad, buf)
                held = (p.untyped_storage(), prev_t.untyped_storage(), bits_t.untyped_storage(),
                        None if buf is None else buf.untyped_storage())
                call.unchecked.append((p, (sig, held, p.dtype, p.device)))
            # The gradient is new every step after zero_grad(set_to_none=True), so it is
            # compared with the parameter directly, not by address (~0.5 µs): the kernels
            # index it with p's size (grad.data = torch.ones(1) was a SIGSEGV).
            elif grad.shape != shape or grad.dtype is not last[2] or grad.device != last[3]:
                _check_step_tensors(qualified, p, grad, None)
            call.add(p, grad, prev_t, bits_t, bound)
        return plain, plain_grads, calls

    def _constrained_step(self, call: _Call, max_bit: int, lr: float, momentum: float,
                          nesterov: bool, wd: float) -> None:
        args = (call.ws, call.grads, call.prevs, call.bits, call.bounds, max_bit, lr,
                call.bufs if momentum != 0 else None, momentum, call.damps, nesterov, wd)
        if not call.unchecked:
            count = blip_kernels.constrained_sgd_step_foreach_(*args, validate=False)
        else:
            with blip_kernels.value_checks(True):
                count = blip_kernels.constrained_sgd_step_foreach_(*args)
            self._checked.update(call.unchecked)  # parameter -> (signature, storages)
        self._add_skipped(count)

    def _plain_sgd(self, params: list[Tensor], grads: list[Tensor], lr: float, momentum: float,
                   dampening: float, wd: float, nesterov: bool) -> None:
        """torch's own SGD math (multi-tensor) for the unconstrained parameters."""
        if momentum == 0 and wd == 0:
            # What torch's sgd() reduces to here (p -= lr·g, the same kernel whether
            # foreach or not), without its ~20 µs of grouping and dispatch per step.
            torch._foreach_add_(params, grads, alpha=-lr)
            return
        bufs = [self.state[p].get("momentum_buffer") for p in params]
        sgd(
            params, grads, bufs, weight_decay=wd, momentum=momentum, lr=lr,
            dampening=dampening, nesterov=nesterov, maximize=False,
            foreach=params[0].device.type != "cpu" or len(params) > 1,
        )
        if momentum != 0:
            for p, buf in zip(params, bufs, strict=True):
                self.state[p]["momentum_buffer"] = buf


def project_model_(model: nn.Module) -> Tensor | None:
    """Section-4 projection of every quantized layer, for use after any optimizer step.

    Returns the number of NaN/Inf weights reset to ``prev`` as an int64 0-d tensor
    (no sync), or None if the model has no quantized layer.
    """
    total = None
    with blip_kernels.value_checks(False), torch.no_grad():
        for _, layer in quantized_layers(model):
            n = layer.project_()
            total = n if total is None else total + n.to(total.device)
    return total


__all__ = ["ConstrainedSGD", "project_model_"]
