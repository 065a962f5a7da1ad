"""The public BLIP ops: argument checks, ``torch.library`` custom ops, dispatch.

Each op is declared once as a ``blip::`` custom op with a fake (meta)
implementation, so it works under ``torch.compile`` and passes
``torch.library.opcheck``. Its real implementation picks a backend through
:mod:`blip_kernels.backends` at call time.

Dtypes: ``bits`` is uint8; ``prev``, Fisher buffers and momentum buffers are
fp32; parameters (and their gradients, and Fisher inputs) may be fp32, bf16 or
fp16. All arithmetic is fp32. For fp32 parameters every op except Fisher is
bit-exact across backends. For bf16/fp16 the result is the fp32 result rounded
to nearest-even in the parameter's dtype, so a projected weight can lie up to
half an ulp of that dtype outside ``prev ± bound·2^-bits``.

Non-finite values (decided here, the same in every backend): an element whose
gradient is NaN/Inf is skipped by :func:`constrained_sgd_step_` (its weight and
momentum stay as they were); :func:`project_` resets a NaN/Inf weight to
``prev``. Both return the number of such elements as an int64 0-d tensor on the
parameter's device, so a training loop can report them without a sync per step.

Checks (the same on every backend, before any backend runs): the public functions
below and the registered ``torch.ops.blip.*`` ops validate every argument (types,
dtypes, shapes, devices, dense layout, memory overlap between a written tensor and
any other argument, scalars finite in fp32 and in range) and name the offending one
in the error. ``bits <= max_bit`` reads the data and can be switched off per context
with :func:`value_checks`. The native backend re-checks in C++ (csrc/ops.cpp) for
callers that skip these (``validate=False``). In-place ops tell autograd about their
writes (version counters) and refuse inference tensors outside inference mode.
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
import numbers
from collections.abc import Callable, Iterator, Sequence
from types import ModuleType

import torch
import torch.autograd.forward_ad as _fwad
from torch import Tensor

from . import backends

PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_SUPPORTED_BIT = 24  # 2^bits scalings stay exact in fp32 well inside this
#: Largest task id: task+1 and task+2 are exact in fp32, so every backend agrees.
MAX_TASK = 2**24 - 2
# Doubles at or above 2^128 - 2^103 round to inf in fp32; positive ones up to 2^-150 to 0.
_F32_OVERFLOW = 2.0**128 - 2.0**103
_F32_ZERO = 2.0**-150

# Per context (thread / asyncio task) like backends.use_backend.
_value_checks: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "blip_kernels_value_checks", default=True
)


@contextlib.contextmanager
def value_checks(enabled: bool) -> Iterator[None]:
    """Turn the data-dependent checks (``bits <= max_bit``) on or off in a block.

    They read ``bits`` once (and sync a GPU); a loop that only ever changes
    ``bits`` through :func:`update_bits_` (which caps them) may skip them. The
    setting belongs to the current context: other threads and asyncio tasks keep
    theirs. Memory-safety checks (shapes, dtypes, devices) always run.
    """
    if not isinstance(enabled, bool):
        raise TypeError(f"value_checks(enabled) takes a bool; got {enabled!r}")
    token = _value_checks.set(enabled)
    try:
        yield
    finally:
        _value_checks.reset(token)


# ---------------------------------------------------------------------------
# argument checks: every message names the argument


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _real(name: str, v: object) -> float:
    """v as a float: Python and numpy numbers count; bools, strings, None do not."""
    if type(v) is float:  # the usual case, without the ABC isinstance below (~0.4 µs)
        return v
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name} must be a number; got {v!r} ({type(v).__name__})")
    return float(v)


def _is_int(v: object) -> bool:
    # numpy integers count, bools do not (True is not a bit count or a task id)
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _int(name: str, v: object, lo: int, hi: int | None = None) -> int:
    rng = f"in {lo}..{hi}" if hi is not None else f">= {lo}"
    _check(_is_int(v) and lo <= v and (hi is None or v <= hi),
           f"{name} must be an int {rng}; got {v!r}")
    return int(v)


def _finite_f32(v: float) -> bool:
    return abs(v) < _F32_OVERFLOW  # False for NaN and inf too


def _check_tensor(
    name: str,
    t: object,
    dtypes: Sequence[torch.dtype],
    shape: torch.Size | None = None,
    device: torch.device | None = None,
) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor; got layout {t.layout}")
    if t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        got = str(t.dtype).replace("torch.", "")
        raise TypeError(f"{name} must have dtype {allowed}; got {got}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device}; expected {device} like the other tensors")
    if shape is not None and t.shape != shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)}; expected {tuple(shape)}")


def _check_written(name: str, t: Tensor) -> None:
    # What torch's own in-place ops refuse, said before anything is written.
    if t.is_inference() and not torch.is_inference_mode_enabled():
        raise RuntimeError(
            f"{name} is an inference tensor (created under torch.inference_mode()): an "
            "in-place update outside inference mode is not allowed; clone it first"
        )


def _span(t: Tensor) -> tuple[int, int]:
    """Byte range [start, end) a strided tensor can touch (start == end: no elements)."""
    start = t.data_ptr()
    if t.is_contiguous():
        return start, start + t.nbytes
    if t.numel() == 0:
        return start, start
    last = sum((n - 1) * st for n, st in zip(t.shape, t.stride(), strict=True))
    return start, start + (last + 1) * t.element_size()


def _check_disjoint(written: Sequence[tuple[str, Tensor | None]],
                    read: Sequence[tuple[str, Tensor | None]]) -> None:
    """No written tensor shares memory with another argument.

    The backends read and write in different orders, so an overlap would make the
    result depend on the backend (or on the thread schedule). Conservative for
    non-contiguous views (it compares their whole byte ranges).
    """
    spans = [(n, *_span(t)) for n, t in written if t is not None]
    n_written = len(spans)
    spans += [(n, *_span(t)) for n, t in read if t is not None]
    for i in range(n_written):
        wname, w0, w1 = spans[i]
        for j, (oname, o0, o1) in enumerate(spans):
            if j != i and w0 < o1 and o0 < w1 and w0 < w1 and o0 < o1:
                raise ValueError(
                    f"{wname} and {oname} share memory; an in-place op's output must not "
                    "overlap its other arguments (pass a clone)"
                )


def _has_data(*tensors: object) -> bool:
    """Whether the tensors' values and addresses can be read (not meta, not traced)."""
    if torch.compiler.is_compiling():
        return False
    for t in tensors:  # noqa: SIM110 - a plain loop: no generator per op call
        if isinstance(t, Tensor) and t.is_meta:
            return False
    return True


def _in_forward_ad() -> bool:
    # forward_ad keeps the innermost dual level in a module global (-1 outside any);
    # reading it is ~30x cheaper than unpack_dual. Without it: always unpack (correct).
    return getattr(_fwad, "_current_level", 0) >= 0


def _check_bound(bound: object, name: str = "bound") -> None:
    b = _real(name, bound)
    _check(_F32_ZERO < b < _F32_OVERFLOW,
           f"{name} must be a positive finite number (finite in float32); got {bound!r}")


def _check_at_least_zero(name: str, v: object) -> None:
    f = _real(name, v)
    _check(_finite_f32(f) and f >= 0,
           f"{name} must be a finite number >= 0 (finite in float32); got {v!r}")


def _check_max_bit(max_bit: object) -> None:
    _int("max_bit", max_bit, 1, MAX_SUPPORTED_BIT)


def _check_bits(
    bits: Tensor, max_bit: int, shape: torch.Size, device: torch.device, name: str = "bits",
    data: bool = True,
) -> None:
    _check_tensor(name, bits, (torch.uint8,), shape, device)
    if data and _value_checks.get() and bits.numel():
        top = int(bits.max())
        _check(top <= max_bit, f"{name} must be <= max_bit={max_bit}; found a value of {top}")


#: Argument names in error messages: the single-tensor op's, or "ws[3]"... for the foreach op.
_SGD_NAMES = {k: k for k in ("w", "grad", "prev", "bits", "bound", "momentum_buf", "dampening")}
_FOREACH_NAMES = {"w": "ws", "grad": "grads", "prev": "prevs", "bits": "bits", "bound": "bounds",
                  "momentum_buf": "momentum_bufs", "dampening": "dampenings"}


def _check_param_state(
    w: Tensor, prev: Tensor, bits: Tensor, bound: float, max_bit: int,
    names: dict[str, str] = _SGD_NAMES, device: torch.device | None = None, data: bool = True,
) -> None:
    _check_tensor(names["w"], w, PARAM_DTYPES, device=device)
    _check_tensor(names["prev"], prev, (torch.float32,), w.shape, w.device)
    _check_bound(bound, names["bound"])
    _check_max_bit(max_bit)
    _check_bits(bits, max_bit, w.shape, w.device, names["bits"], data)


def _check_quantize(w: Tensor, bits: Tensor, bound: float, data: bool) -> None:
    _check_tensor("w", w, PARAM_DTYPES)
    _check_bound(bound)
    _check_bits(bits, MAX_SUPPORTED_BIT, w.shape, w.device, data=data)


def _check_project(w: Tensor, prev: Tensor, bits: Tensor, bound: float, max_bit: int,
                   data: bool) -> None:
    _check_param_state(w, prev, bits, bound, max_bit, data=data)
    _check_written("w", w)
    if data:
        _check_disjoint([("w", w)], [("prev", prev), ("bits", bits)])


def _check_sync(w: Tensor, prev: Tensor, bits: Tensor, bound: float, data: bool) -> None:
    _check_tensor("w", w, PARAM_DTYPES)
    _check_tensor("prev", prev, (torch.float32,), w.shape, w.device)
    _check_bits(bits, MAX_SUPPORTED_BIT, w.shape, w.device, data=data)
    _check_bound(bound)
    _check_written("w", w)
    _check_written("prev", prev)
    if data:
        _check_disjoint([("w", w), ("prev", prev)], [("bits", bits)])


def _check_update_bits(bits: Tensor, fisher: Tensor, fisher_old: Tensor, task: int,
                       max_bit: int, data: bool) -> None:
    _check_tensor("fisher", fisher, (torch.float32,))
    _check_tensor("fisher_old", fisher_old, (torch.float32,), fisher.shape, fisher.device)
    _int("task", task, 0, MAX_TASK)
    _check_max_bit(max_bit)
    _check_bits(bits, max_bit, fisher.shape, fisher.device, data=data)
    for name, t in (("bits", bits), ("fisher", fisher), ("fisher_old", fisher_old)):
        _check_written(name, t)
    if data:
        _check_disjoint([("bits", bits), ("fisher", fisher), ("fisher_old", fisher_old)], [])


def _check_sgd_scalars(lr: float, momentum: float, nesterov: bool, weight_decay: float) -> None:
    _check_at_least_zero("lr", lr)
    m = _real("momentum", momentum)
    _check(0 <= m < 1, f"momentum must be in [0, 1); got {momentum!r}")
    _check_at_least_zero("weight_decay", weight_decay)
    if not (isinstance(nesterov, bool) or (_is_int(nesterov) and nesterov in (0, 1))):
        raise TypeError(f"nesterov must be a bool; got {nesterov!r}")


def _check_sgd_tensors(
    w: Tensor, grad: Tensor, prev: Tensor, bits: Tensor, bound: float, max_bit: int,
    momentum_buf: Tensor | None, momentum: float, dampening: float, nesterov: bool,
    names: dict[str, str], device: torch.device | None, data: bool,
) -> None:
    """One parameter's part of a fused step (the scalars common to all are checked apart)."""
    _check_param_state(w, prev, bits, bound, max_bit, names, device, data)
    _check_tensor(names["grad"], grad, (w.dtype,), w.shape, w.device)
    d = _real(names["dampening"], dampening)
    _check(0 <= d <= 1, f"{names['dampening']} must be in [0, 1]; got {dampening!r}")
    _check(
        not nesterov or (momentum > 0 and d == 0),
        "nesterov requires momentum > 0 and dampening == 0"
        + ("" if names is _SGD_NAMES else f" ({names['dampening']} is {dampening!r})"),
    )
    buf_name = names["momentum_buf"]
    if momentum != 0:
        _check(momentum_buf is not None, f"{buf_name} is required when momentum != 0")
    if momentum_buf is not None:
        _check_tensor(buf_name, momentum_buf, (torch.float32,), w.shape, w.device)
        _check_written(buf_name, momentum_buf)
    _check_written(names["w"], w)
    if data:
        _check_disjoint([(names["w"], w), (buf_name, momentum_buf)],
                        [(names["grad"], grad), (names["prev"], prev), (names["bits"], bits)])


def _check_sgd(
    w: Tensor, grad: Tensor, prev: Tensor, bits: Tensor, momentum_buf: Tensor | None,
    bound: float, max_bit: int, lr: float, momentum: float, dampening: float, nesterov: bool,
    weight_decay: float, data: bool,
) -> None:
    _check_sgd_scalars(lr, momentum, nesterov, weight_decay)
    _check_sgd_tensors(w, grad, prev, bits, bound, max_bit, momentum_buf, momentum, dampening,
                       nesterov, _SGD_NAMES, None, data)


def _check_sgd_foreach(
    ws: Sequence[Tensor], grads: Sequence[Tensor], prevs: Sequence[Tensor],
    bits: Sequence[Tensor], momentum_bufs: Sequence[Tensor | None] | None,
    bounds: Sequence[float], max_bit: int, lr: float, momentum: float,
    dampenings: Sequence[float], nesterov: bool, weight_decay: float, data: bool,
) -> None:
    lists = {"ws": ws, "grads": grads, "prevs": prevs, "bits": bits, "bounds": bounds,
             "dampenings": dampenings}
    if momentum_bufs is not None:
        lists["momentum_bufs"] = momentum_bufs
    for name, seq in lists.items():
        _check(isinstance(seq, (list, tuple)),
               f"{name} must be a list or tuple; got {type(seq).__name__}")
        _check(len(seq) == len(ws), f"{name} has {len(seq)} entries; ws has {len(ws)}")
    _check_sgd_scalars(lr, momentum, nesterov, weight_decay)
    _check_max_bit(max_bit)
    if momentum != 0:
        _check(momentum_bufs is not None, "momentum_bufs is required when momentum != 0")
    device = ws[0].device if ws and isinstance(ws[0], Tensor) else None
    for i in range(len(ws)):
        names = {k: f"{v}[{i}]" for k, v in _FOREACH_NAMES.items()}
        _check_sgd_tensors(
            ws[i], grads[i], prevs[i], bits[i], bounds[i], max_bit,
            None if momentum_bufs is None else momentum_bufs[i], momentum, dampenings[i],
            nesterov, names, device, data,
        )


def _check_fisher_buffers(fisher_w: Tensor, fisher_b: Tensor | None, out_features: int) -> None:
    _check_tensor("fisher_w", fisher_w, (torch.float32,))
    _check_written("fisher_w", fisher_w)
    if fisher_b is not None:
        _check_tensor("fisher_b", fisher_b, (torch.float32,), torch.Size([out_features]),
                      fisher_w.device)
        _check_written("fisher_b", fisher_b)


def _check_fisher_disjoint(fisher_w: Tensor, fisher_b: Tensor | None, x: Tensor,
                           grad_out: Tensor, data: bool) -> None:
    if data:
        _check_disjoint([("fisher_w", fisher_w), ("fisher_b", fisher_b)],
                        [("x", x), ("grad_out", grad_out)])


def _check_fisher_linear(fisher_w: Tensor, fisher_b: Tensor | None, x: Tensor,
                         grad_out: Tensor, scale: float, data: bool) -> None:
    _check_tensor("x", x, PARAM_DTYPES)
    _check(x.dim() in (2, 3),
           f"x must be 2-D (N, in) or 3-D (N, L, in); got shape {tuple(x.shape)}")
    _check_tensor("grad_out", grad_out, PARAM_DTYPES, device=x.device)
    _check(
        grad_out.dim() == x.dim() and grad_out.shape[:-1] == x.shape[:-1],
        f"grad_out has shape {tuple(grad_out.shape)}; expected {tuple(x.shape[:-1])} + (out,)",
    )
    out_f, in_f = grad_out.shape[-1], x.shape[-1]
    _check_fisher_buffers(fisher_w, fisher_b, out_f)
    _check(fisher_w.shape == (out_f, in_f),
           f"fisher_w has shape {tuple(fisher_w.shape)}; expected {(out_f, in_f)}")
    _check(fisher_w.device == x.device, f"fisher_w is on {fisher_w.device}; x is on {x.device}")
    _check_at_least_zero("scale", scale)  # negative would make a sum of squares negative
    _check_fisher_disjoint(fisher_w, fisher_b, x, grad_out, data)


# Conv geometry below 2^31 keeps the kernels' index math far from int64 overflow.
_MAX_CONV = 2**31 - 1


def _pair(name: str, v: object, lo: int) -> list[int]:
    """An int or a pair of ints (numpy ints count, bools do not) as a list of 2 ints."""
    pair = [v, v] if _is_int(v) else list(v) if isinstance(v, (list, tuple)) else None
    _check(pair is not None and len(pair) == 2 and all(_is_int(i) for i in pair),
           f"{name} must be an int or a pair of ints; got {v!r}")
    _check(all(lo <= i <= _MAX_CONV for i in pair),
           f"{name} must be {'positive' if lo else '>= 0'} (and below 2^31); got {v!r}")
    return [int(i) for i in pair]


def _check_fisher_conv2d(
    fisher_w: Tensor, fisher_b: Tensor | None, x: Tensor, grad_out: Tensor, stride: object,
    padding: object, dilation: object, groups: object, scale: float, data: bool,
) -> tuple[list[int], list[int], list[int]]:
    """Checks; returns stride, padding and dilation as lists of two ints."""
    st, pad = _pair("stride", stride, 1), _pair("padding", padding, 0)
    dil = _pair("dilation", dilation, 1)
    _check_tensor("x", x, PARAM_DTYPES)
    _check(x.dim() == 4, f"x must be 4-D (N, C_in, H, W); got shape {tuple(x.shape)}")
    _check_tensor("fisher_w", fisher_w, (torch.float32,), device=x.device)
    _check(fisher_w.dim() == 4, f"fisher_w must be 4-D; got shape {tuple(fisher_w.shape)}")
    out_ch, cin_g, kh, kw = fisher_w.shape
    _check(kh >= 1 and kw >= 1, f"fisher_w has a {kh}x{kw} kernel; it must be at least 1x1")
    _check(_is_int(groups) and 1 <= groups <= _MAX_CONV and x.shape[1] % groups == 0
           and out_ch % groups == 0, f"groups={groups!r} must divide C_in and C_out")
    _check(cin_g * groups == x.shape[1],
           f"fisher_w has C_in/groups={cin_g} but x has C_in={x.shape[1]} with groups={groups}")
    ho = (x.shape[2] + 2 * pad[0] - dil[0] * (kh - 1) - 1) // st[0] + 1
    wo = (x.shape[3] + 2 * pad[1] - dil[1] * (kw - 1) - 1) // st[1] + 1
    _check(ho >= 1 and wo >= 1,
           f"kernel {kh}x{kw} with dilation {dil} is larger than the padded input "
           f"{x.shape[2] + 2 * pad[0]}x{x.shape[3] + 2 * pad[1]}")
    _check_tensor("grad_out", grad_out, PARAM_DTYPES, torch.Size([x.shape[0], out_ch, ho, wo]),
                  x.device)
    _check_fisher_buffers(fisher_w, fisher_b, out_ch)
    _check_at_least_zero("scale", scale)
    _check_fisher_disjoint(fisher_w, fisher_b, x, grad_out, data)
    return st, pad, dil


# ---------------------------------------------------------------------------
# custom ops. Each op has a run function (no checks; contiguity is handled here so
# backends only see dense tensors), a registered implementation = checks + run (what
# torch.ops.blip.<op> calls), and a fake implementation = the checks that need no data.
# The public functions check once and call the run function directly when that is the
# same as calling the op (see _direct), else the op.

_PLAIN = (Tensor, torch.nn.Parameter)


def _no_grad() -> contextlib.AbstractContextManager:
    # Entering torch.no_grad() costs a few µs; optimizer steps already run without grad.
    return torch.no_grad() if torch.is_grad_enabled() else contextlib.nullcontext()


def _direct(*tensors: Tensor | None) -> bool:
    """True when calling an op's run function directly is the same as calling the op.

    Going through the dispatcher to a Python custom op costs ~150 µs per call on a
    small CPU, more than the fused kernel itself on a small layer; in plain eager
    mode (no compile/tracing, no dispatch or function modes, no functorch
    transforms, plain tensors) the dispatcher would only call the same function.
    """
    if (
        torch.compiler.is_compiling()
        or torch._C._len_torch_dispatch_stack()
        or torch._C._is_torch_function_mode_enabled()
        or torch._C._are_functorch_transforms_active()
    ):
        return False
    return all(t is None or type(t) in _PLAIN for t in tensors)


def _backend(t: Tensor) -> ModuleType:
    return backends.resolve(t.device)


def _dense(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.contiguous()


def _announce_writes(be: ModuleType, targets: Sequence[Tensor | None]) -> None:
    """Bump the version counters of the tensors ``be`` is about to write.

    Autograd then raises for a graph that saved one of them, as for any in-place
    torch op. The reference writes with ``copy_`` (which bumps too, but only as it
    goes); ``cpp`` bumps in C++ (``TRACKS_WRITES``) so the foreach hot loop stays free
    of Python per-tensor work; triton's raw-pointer kernels need it done here.
    """
    if getattr(be, "TRACKS_WRITES", False):
        return
    ts = [t for t in targets if t is not None]
    if torch.is_inference_mode_enabled():
        ts = [t for t in ts if not t.is_inference()]  # they have no counter to bump
    torch.autograd.graph.increment_version(ts)  # raises for inference tensors outside


def _inplace(be: ModuleType, targets: Sequence[Tensor | None], run: Callable[..., object]
             ) -> object:
    """Call ``run(*dense_targets)`` and write results back to non-contiguous targets."""
    _announce_writes(be, targets)
    dense = [_dense(t) for t in targets]
    result = run(*dense)
    for orig, d in zip(targets, dense, strict=False):
        if orig is not None and d is not orig:
            orig.copy_(d)
    return result


def _quantize_run(w: Tensor, bits: Tensor, bound: float) -> Tensor:
    return _backend(w).quantize(w.contiguous(), bits.contiguous(), bound).view(w.shape)


def _quantize_impl(w: Tensor, bits: Tensor, bound: float) -> Tensor:
    _check_quantize(w, bits, bound, _has_data(w, bits))
    return _quantize_run(w, bits, bound)


_quantize_op = torch.library.custom_op("blip::quantize", mutates_args=())(_quantize_impl)


@_quantize_op.register_fake
def _(w: Tensor, bits: Tensor, bound: float) -> Tensor:
    _check_quantize(w, bits, bound, data=False)
    return torch.empty(w.shape, dtype=w.dtype, device=w.device)


def _quantize_setup(ctx, inputs, output) -> None:  # noqa: ANN001
    pass


def _quantize_backward(ctx, grad: Tensor):  # noqa: ANN001, ANN202
    return grad, None, None  # straight-through estimator


torch.library.register_autograd("blip::quantize", _quantize_backward, setup_context=_quantize_setup)


def _project_run(w: Tensor, prev: Tensor, bits: Tensor, bound: float, max_bit: int) -> Tensor:
    be = _backend(w)
    return _inplace(
        be, [w], lambda dw: be.project_(dw, _dense(prev), _dense(bits), bound, max_bit)
    )


def _project_impl(w: Tensor, prev: Tensor, bits: Tensor, bound: float, max_bit: int) -> Tensor:
    _check_project(w, prev, bits, bound, max_bit, _has_data(w, prev, bits))
    return _project_run(w, prev, bits, bound, max_bit)


_project_op = torch.library.custom_op("blip::project_", mutates_args=("w",))(_project_impl)


@_project_op.register_fake
def _(w: Tensor, prev: Tensor, bits: Tensor, bound: float, max_bit: int) -> Tensor:
    _check_project(w, prev, bits, bound, max_bit, data=False)
    return torch.empty((), dtype=torch.int64, device=w.device)


def _sgd_run(
    w: Tensor,
    grad: Tensor,
    prev: Tensor,
    bits: Tensor,
    momentum_buf: Tensor | None,
    bound: float,
    max_bit: int,
    lr: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    weight_decay: float,
) -> Tensor:
    be = _backend(w)
    return _inplace(
        be,
        [w, momentum_buf],
        lambda dw, dbuf: be.sgd_step_(
            dw, _dense(grad), _dense(prev), _dense(bits), dbuf, bound, max_bit,
            lr, momentum, dampening, nesterov, weight_decay,
        ),
    )


def _sgd_impl(
    w: Tensor,
    grad: Tensor,
    prev: Tensor,
    bits: Tensor,
    momentum_buf: Tensor | None,
    bound: float,
    max_bit: int,
    lr: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    weight_decay: float,
) -> Tensor:
    args = (w, grad, prev, bits, momentum_buf, bound, max_bit, lr, momentum, dampening, nesterov,
            weight_decay)
    _check_sgd(*args, data=_has_data(w, grad, prev, bits, momentum_buf))
    return _sgd_run(*args)


_sgd_op = torch.library.custom_op(
    "blip::constrained_sgd_step_", mutates_args=("w", "momentum_buf")
)(_sgd_impl)


@_sgd_op.register_fake
def _(w, grad, prev, bits, momentum_buf, bound, max_bit, lr, momentum, dampening, nesterov,
      weight_decay) -> Tensor:  # noqa: ANN001
    _check_sgd(w, grad, prev, bits, momentum_buf, bound, max_bit, lr, momentum, dampening,
               nesterov, weight_decay, data=False)
    return torch.empty((), dtype=torch.int64, device=w.device)


def _sgd_foreach_run(
    ws: list[Tensor],
    grads: list[Tensor],
    prevs: list[Tensor],
    bits: list[Tensor],
    momentum_bufs: list[Tensor] | None,
    bounds: list[float],
    max_bit: int,
    lr: float,
    momentum: float,
    dampenings: list[float],
    nesterov: bool,
    weight_decay: float,
) -> Tensor:
    be = _backend(ws[0])
    bufs = momentum_bufs if momentum_bufs is not None else []
    if not getattr(be, "TRACKS_WRITES", False):
        _announce_writes(be, [*ws, *bufs])
    if all(map(Tensor.is_contiguous, itertools.chain(ws, grads, prevs, bits, bufs))):
        # The usual case (parameters, grads and buffers are dense): no copies at all.
        return be.sgd_step_foreach_(ws, grads, prevs, bits, momentum_bufs, bounds, max_bit, lr,
                                    momentum, dampenings, nesterov, weight_decay)
    targets = [*ws, *bufs]
    dense = [t.contiguous() for t in targets]
    n = len(ws)
    count = be.sgd_step_foreach_(
        dense[:n], [g.contiguous() for g in grads], [p.contiguous() for p in prevs],
        [b.contiguous() for b in bits], None if momentum_bufs is None else dense[n:], bounds,
        max_bit, lr, momentum, dampenings, nesterov, weight_decay,
    )
    for orig, d in zip(targets, dense, strict=True):  # write back as _inplace does
        if d is not orig:
            orig.copy_(d)
    return count


def _sgd_foreach_impl(
    ws: list[Tensor],
    grads: list[Tensor],
    prevs: list[Tensor],
    bits: list[Tensor],
    momentum_bufs: list[Tensor] | None,
    bounds: list[float],
    max_bit: int,
    lr: float,
    momentum: float,
    dampenings: list[float],
    nesterov: bool,
    weight_decay: float,
) -> Tensor:
    args = (ws, grads, prevs, bits, momentum_bufs, bounds, max_bit, lr, momentum, dampenings,
            nesterov, weight_decay)
    _check_sgd_foreach(*args, data=_has_data(*ws, *grads, *prevs, *bits, *(momentum_bufs or ())))
    if not ws:
        return torch.zeros((), dtype=torch.int64)
    return _sgd_foreach_run(*args)


# Written out: infer_schema does not take an optional list of tensors (Tensor[]?).
_sgd_foreach_op = torch.library.custom_op(
    "blip::constrained_sgd_step_foreach_",
    mutates_args=("ws", "momentum_bufs"),
    schema="(Tensor(a!)[] ws, Tensor[] grads, Tensor[] prevs, Tensor[] bits, "
    "Tensor(b!)[]? momentum_bufs, float[] bounds, int max_bit, float lr, float momentum, "
    "float[] dampenings, bool nesterov, float weight_decay) -> Tensor",
)(_sgd_foreach_impl)


@_sgd_foreach_op.register_fake
def _(ws, grads, prevs, bits, momentum_bufs, bounds, max_bit, lr, momentum, dampenings, nesterov,
      weight_decay) -> Tensor:  # noqa: ANN001
    _check_sgd_foreach(ws, grads, prevs, bits, momentum_bufs, bounds, max_bit, lr, momentum,
                       dampenings, nesterov, weight_decay, data=False)
    return torch.empty((), dtype=torch.int64, device=ws[0].device if ws else None)


def _update_bits_run(
    bits: Tensor, fisher: Tensor, fisher_old: Tensor, task: int, max_bit: int
) -> None:
    be = _backend(bits)
    _inplace(be, [bits, fisher, fisher_old],
             lambda b, f, fo: be.update_bits_(b, f, fo, task, max_bit))


def _update_bits_impl(
    bits: Tensor, fisher: Tensor, fisher_old: Tensor, task: int, max_bit: int
) -> None:
    _check_update_bits(bits, fisher, fisher_old, task, max_bit, _has_data(bits, fisher, fisher_old))
    _update_bits_run(bits, fisher, fisher_old, task, max_bit)


_update_bits_op = torch.library.custom_op(
    "blip::update_bits_", mutates_args=("bits", "fisher", "fisher_old")
)(_update_bits_impl)


@_update_bits_op.register_fake
def _(bits: Tensor, fisher: Tensor, fisher_old: Tensor, task: int, max_bit: int) -> None:
    _check_update_bits(bits, fisher, fisher_old, task, max_bit, data=False)


def _sync_run(w: Tensor, prev: Tensor, bits: Tensor, bound: float) -> None:
    be = _backend(w)
    _inplace(be, [w, prev], lambda dw, dp: be.sync_(dw, dp, _dense(bits), bound))


def _sync_impl(w: Tensor, prev: Tensor, bits: Tensor, bound: float) -> None:
    _check_sync(w, prev, bits, bound, _has_data(w, prev, bits))
    _sync_run(w, prev, bits, bound)


_sync_op = torch.library.custom_op("blip::sync_", mutates_args=("w", "prev"))(_sync_impl)


@_sync_op.register_fake
def _(w: Tensor, prev: Tensor, bits: Tensor, bound: float) -> None:
    _check_sync(w, prev, bits, bound, data=False)


def _fisher_linear_run(
    fisher_w: Tensor, fisher_b: Tensor | None, x: Tensor, grad_out: Tensor, scale: float
) -> None:
    if scale <= _F32_ZERO:
        return  # adds nothing, not even 0·inf = NaN of an overflowed square (every backend)
    be = _backend(fisher_w)
    _inplace(
        be,
        [fisher_w, fisher_b],
        lambda fw, fb: be.fisher_linear_(fw, fb, _dense(x), _dense(grad_out), scale),
    )


def _fisher_linear_impl(
    fisher_w: Tensor, fisher_b: Tensor | None, x: Tensor, grad_out: Tensor, scale: float
) -> None:
    _check_fisher_linear(fisher_w, fisher_b, x, grad_out, scale,
                         _has_data(fisher_w, fisher_b, x, grad_out))
    _fisher_linear_run(fisher_w, fisher_b, x, grad_out, scale)


_fisher_linear_op = torch.library.custom_op(
    "blip::fisher_linear_", mutates_args=("fisher_w", "fisher_b")
)(_fisher_linear_impl)


@_fisher_linear_op.register_fake
def _(fisher_w, fisher_b, x, grad_out, scale) -> None:  # noqa: ANN001
    _check_fisher_linear(fisher_w, fisher_b, x, grad_out, scale, data=False)


def _fisher_conv2d_run(
    fisher_w: Tensor,
    fisher_b: Tensor | None,
    x: Tensor,
    grad_out: Tensor,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    scale: float,
) -> None:
    if scale <= _F32_ZERO:
        return  # as in _fisher_linear_run
    be = _backend(fisher_w)
    _inplace(
        be,
        [fisher_w, fisher_b],
        lambda fw, fb: be.fisher_conv2d_(
            fw, fb, _dense(x), _dense(grad_out), tuple(stride), tuple(padding),
            tuple(dilation), groups, scale,
        ),
    )


def _fisher_conv2d_impl(
    fisher_w: Tensor,
    fisher_b: Tensor | None,
    x: Tensor,
    grad_out: Tensor,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    scale: float,
) -> None:
    st, pad, dil = _check_fisher_conv2d(fisher_w, fisher_b, x, grad_out, stride, padding,
                                        dilation, groups, scale,
                                        _has_data(fisher_w, fisher_b, x, grad_out))
    _fisher_conv2d_run(fisher_w, fisher_b, x, grad_out, st, pad, dil, groups, scale)


_fisher_conv2d_op = torch.library.custom_op(
    "blip::fisher_conv2d_", mutates_args=("fisher_w", "fisher_b")
)(_fisher_conv2d_impl)


@_fisher_conv2d_op.register_fake
def _(fisher_w, fisher_b, x, grad_out, stride, padding, dilation, groups, scale) -> None:  # noqa: ANN001
    _check_fisher_conv2d(fisher_w, fisher_b, x, grad_out, stride, padding, dilation, groups,
                         scale, data=False)


# ---------------------------------------------------------------------------
# public API


def quantize(w: Tensor, bits: Tensor, bound: float) -> Tensor:
    """Section 1: ``rint(w/bound·2^bits)/2^bits·bound``, 0 where ``bits == 0`` (no gradient)."""
    _check_quantize(w, bits, bound, _has_data(w, bits))
    w = w.detach()
    return (_quantize_run if _direct(w, bits) else _quantize_op)(w, bits, float(bound))


def quantize_ste(w: Tensor, bits: Tensor, bound: float) -> Tensor:
    """:func:`quantize` whose backward passes the gradient through unchanged.

    Forward-mode AD (``torch.autograd.forward_ad``) is straight-through as well: the
    output carries ``w``'s tangent unchanged, on every backend.
    """
    _check_quantize(w, bits, bound, _has_data(w, bits))
    if _in_forward_ad() and not torch.compiler.is_compiling():
        primal, tangent = _fwad.unpack_dual(w)
        if tangent is not None:
            return _fwad.make_dual(quantize_ste(primal, bits, bound), tangent)
    fn = _quantize_run if not (w.requires_grad and torch.is_grad_enabled()) and _direct(
        w, bits) else _quantize_op
    return fn(w, bits, float(bound))


def project_(w: Tensor, prev: Tensor, bits: Tensor, bound: float, max_bit: int) -> Tensor:
    """Section 4 in place, for use after any optimizer (Adam...).

    Returns the number of NaN/Inf weights, which are reset to ``prev``.
    """
    _check_project(w, prev, bits, bound, max_bit, _has_data(w, prev, bits))
    with _no_grad():
        fn = _project_run if _direct(w, prev, bits) else _project_op
        return fn(w, prev, bits, float(bound), int(max_bit))


def constrained_sgd_step_(
    w: Tensor,
    grad: Tensor,
    prev: Tensor,
    bits: Tensor,
    bound: float,
    max_bit: int,
    lr: float,
    momentum_buf: Tensor | None = None,
    momentum: float = 0.0,
    dampening: float = 0.0,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    *,
    validate: bool = True,
) -> Tensor:
    """``torch.optim.SGD``'s step then the section-4 projection, in one pass over memory.

    ``momentum_buf`` (fp32, zero-initialised) is required when ``momentum != 0``.
    To match torch's first step (buffer = gradient) pass ``dampening=0`` on the
    first step: ``0·momentum + 1·g`` equals ``g`` exactly. Returns the count of
    elements skipped for a NaN/Inf gradient.

    ``validate=False`` skips the Python argument checks (≈10 µs per call) for a
    caller that validated the same tensors before; the ``cpp`` backend still checks
    shapes, dtypes and devices in C++, the others trust the caller.
    """
    if validate:
        _check_sgd(w, grad, prev, bits, momentum_buf, bound, max_bit, lr, momentum, dampening,
                   nesterov, weight_decay, _has_data(w, grad, prev, bits, momentum_buf))
    with _no_grad():
        fn = _sgd_run if _direct(w, grad, prev, bits, momentum_buf) else _sgd_op
        return fn(
            w, grad, prev, bits, momentum_buf if momentum != 0 else None, float(bound),
            int(max_bit),
            float(lr), float(momentum), float(dampening), bool(nesterov), float(weight_decay),
        )


def constrained_sgd_step_foreach_(
    ws: Sequence[Tensor],
    grads: Sequence[Tensor],
    prevs: Sequence[Tensor],
    bits: Sequence[Tensor],
    bounds: Sequence[float],
    max_bit: int,
    lr: float,
    momentum_bufs: Sequence[Tensor] | None = None,
    momentum: float = 0.0,
    dampenings: float | Sequence[float] = 0.0,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    *,
    validate: bool = True,
) -> Tensor:
    """:func:`constrained_sgd_step_` on every ``ws[i]`` in one call; the summed skip count.

    The lists are parallel (``bounds[i]``, ``momentum_bufs[i]`` belong to ``ws[i]``);
    all tensors are on one device. ``dampenings`` is one float or one per tensor, so
    a caller can pass 0 for a buffer created this step (torch's first step). Each
    backend runs the whole list without returning to Python, which is what makes a
    step over many small layers cheap.
    """
    n = len(ws)
    damps = list(dampenings) if isinstance(dampenings, (list, tuple)) else [dampenings] * n
    if validate:
        _check_sgd_foreach(ws, grads, prevs, bits, momentum_bufs, bounds, max_bit, lr, momentum,
                           damps, nesterov, weight_decay,
                           _has_data(*ws, *grads, *prevs, *bits, *(momentum_bufs or ())))
    if n == 0:
        return torch.zeros((), dtype=torch.int64)
    # The custom op takes lists; ConstrainedSGD passes lists, so these copy nothing.
    ws, grads, prevs, bits = _list(ws), _list(grads), _list(prevs), _list(bits)
    bufs = _list(momentum_bufs) if momentum != 0 else None
    fn = _sgd_foreach_run if _direct(*ws, *grads, *prevs, *bits, *(bufs or ())) else (
        _sgd_foreach_op)
    args = (ws, grads, prevs, bits, bufs, [float(b) for b in bounds], int(max_bit), float(lr),
            float(momentum), [float(d) for d in damps], bool(nesterov), float(weight_decay))
    if torch.is_grad_enabled():
        with torch.no_grad():
            return fn(*args)
    return fn(*args)  # optimizer steps already run without grad: skip the context


def _list(seq: Sequence) -> list:
    return seq if type(seq) is list else list(seq)


def update_bits_(bits: Tensor, fisher: Tensor, fisher_old: Tensor, task: int, max_bit: int) -> None:
    """Sections 2 and 3 in one pass: grow ``bits``, fold ``fisher`` into ``fisher_old``, zero it.

    ``task`` counts from 0 and is at most :data:`MAX_TASK` (so task+2 is exact in fp32).
    """
    _check_update_bits(bits, fisher, fisher_old, task, max_bit,
                       _has_data(bits, fisher, fisher_old))
    fn = _update_bits_run if _direct(bits, fisher, fisher_old) else _update_bits_op
    fn(bits, fisher, fisher_old, int(task), int(max_bit))


def sync_(w: Tensor, prev: Tensor, bits: Tensor, bound: float) -> None:
    """Section 5: ``w = quantize(w, bits, bound)``; ``prev = w``."""
    _check_sync(w, prev, bits, bound, _has_data(w, prev, bits))
    with _no_grad():
        (_sync_run if _direct(w, prev, bits) else _sync_op)(w, prev, bits, float(bound))


def fisher_linear_(
    fisher_w: Tensor, fisher_b: Tensor | None, x: Tensor, grad_out: Tensor, scale: float = 1.0
) -> None:
    """Add ``scale·Σ_n g_n²`` of a Linear layer's per-sample gradients to the buffers.

    ``x``: (N, in) or (N, L, in); ``grad_out``: the loss gradient w.r.t. the layer's
    output, (N, out) or (N, L, out). ``fisher_w``: (out, in); ``fisher_b``: (out,) or None.
    """
    _check_fisher_linear(fisher_w, fisher_b, x, grad_out, scale,
                         _has_data(fisher_w, fisher_b, x, grad_out))
    with _no_grad():
        fn = _fisher_linear_run if _direct(fisher_w, fisher_b, x, grad_out) else (
            _fisher_linear_op)
        fn(fisher_w, fisher_b, x, grad_out, float(scale))


def fisher_conv2d_(
    fisher_w: Tensor,
    fisher_b: Tensor | None,
    x: Tensor,
    grad_out: Tensor,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    scale: float = 1.0,
) -> None:
    """Add ``scale·Σ_n g_n²`` of a Conv2d layer's exact per-sample gradients to the buffers.

    ``x``: (N, C_in, H, W); ``grad_out``: (N, C_out, H_out, W_out); ``fisher_w`` has
    the weight's shape (C_out, C_in/groups, kh, kw). Never holds N per-sample gradients.
    """
    st, pad, dil = _check_fisher_conv2d(fisher_w, fisher_b, x, grad_out, stride, padding,
                                        dilation, groups, scale,
                                        _has_data(fisher_w, fisher_b, x, grad_out))
    with _no_grad():
        fn = _fisher_conv2d_run if _direct(fisher_w, fisher_b, x, grad_out) else (
            _fisher_conv2d_op)
        fn(fisher_w, fisher_b, x, grad_out, st, pad, dil, int(groups), float(scale))


__all__ = [
    "MAX_SUPPORTED_BIT",
    "MAX_TASK",
    "PARAM_DTYPES",
    "constrained_sgd_step_",
    "constrained_sgd_step_foreach_",
    "fisher_conv2d_",
    "fisher_linear_",
    "project_",
    "quantize",
    "quantize_ste",
    "sync_",
    "update_bits_",
    "value_checks",
]
