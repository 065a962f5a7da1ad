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
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor

from . import backends

PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_SUPPORTED_BIT = 24  # 2^bits scalings stay exact in fp32 well inside this

_value_checks = True


@contextlib.contextmanager
def value_checks(enabled: bool) -> Iterator[None]:
    """Turn the data-dependent checks (``bits <= max_bit``) on or off in a block.

    They read ``bits`` once (and sync a GPU); a loop that only ever changes
    ``bits`` through :func:`update_bits_` (which caps them) may skip them.
    """
    global _value_checks
    old, _value_checks = _value_checks, enabled
    try:
        yield
    finally:
        _value_checks = old


# ---------------------------------------------------------------------------
# argument checks: every message names the argument


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _check_tensor(
    name: str,
    t: object,
    dtypes: Sequence[torch.dtype],
    shape: torch.Size | None = None,
    device: torch.device | None = None,
) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        got = str(t.dtype).replace("torch.", "")
        raise TypeError(f"{name} must have dtype {allowed}; got {got}")
    if shape is not None and t.shape != shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)}; expected {tuple(shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device}; expected {device} like the other tensors")


def _check_bound(bound: float) -> None:
    _check(
        isinstance(bound, (int, float)) and math.isfinite(bound) and bound > 0,
        f"bound must be a positive finite number; got {bound!r}",
    )


def _check_max_bit(max_bit: int) -> None:
    _check(
        isinstance(max_bit, int) and 1 <= max_bit <= MAX_SUPPORTED_BIT,
        f"max_bit must be an int in 1..{MAX_SUPPORTED_BIT}; got {max_bit!r}",
    )


def _check_bits(bits: Tensor, max_bit: int, shape: torch.Size, device: torch.device) -> None:
    _check_tensor("bits", bits, (torch.uint8,), shape, device)
    if _value_checks and bits.numel() and not torch.compiler.is_compiling():
        top = int(bits.max())
        _check(top <= max_bit, f"bits must be <= max_bit={max_bit}; found a value of {top}")


def _check_param_state(w: Tensor, prev: Tensor, bits: Tensor, bound: float, max_bit: int) -> None:
    _check_tensor("w", w, PARAM_DTYPES)
    _check_tensor("prev", prev, (torch.float32,), w.shape, w.device)
    _check_bound(bound)
    _check_max_bit(max_bit)
    _check_bits(bits, max_bit, w.shape, w.device)


# ---------------------------------------------------------------------------
# custom ops: contiguity is handled here so backends only see dense tensors

_PLAIN = (Tensor, torch.nn.Parameter)


def _no_grad() -> contextlib.AbstractContextManager:
    # Entering torch.no_grad() costs a few µs; optimizer steps already run without grad.
    return torch.no_grad() if torch.is_grad_enabled() else contextlib.nullcontext()


def _direct(*tensors: Tensor | None) -> bool:
    """True when calling an op's implementation directly is the same as calling the op.

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


def _backend(t: Tensor):  # noqa: ANN202 - a backend module
    return backends.resolve(t.device)


def _dense(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.contiguous()


def _inplace(targets: Sequence[Tensor | None], run: Callable[..., object]) -> object:
    """Call ``run(*dense_targets)`` and write results back to non-contiguous targets."""
    dense = [_dense(t) for t in targets]
    result = run(*dense)
    for orig, d in zip(targets, dense, strict=False):
        if orig is not None and d is not orig:
            orig.copy_(d)
    return result


def _quantize_impl(w: Tensor, bits: Tensor, bound: float) -> Tensor:
    return _backend(w).quantize(w.contiguous(), bits.contiguous(), bound).view(w.shape)


_quantize_op = torch.library.custom_op("blip::quantize", mutates_args=())(_quantize_impl)


@_quantize_op.register_fake
def _(w: Tensor, bits: Tensor, bound: float) -> Tensor:
    return torch.empty(w.shape, dtype=w.dtype, device=w.device)


def _quantize_setup(ctx, inputs, output) -> None:  # noqa: ANN001
    pass


def _quantize_backward(ctx, grad: Tensor):  # noqa: ANN001, ANN202
    return grad, None, None  # straight-through estimator


torch.library.register_autograd("blip::quantize", _quantize_backward, setup_context=_quantize_setup)


def _project_impl(w: Tensor, prev: Tensor, bits: Tensor, bound: float, max_bit: int) -> Tensor:
    be = _backend(w)
    return _inplace(
        [w], lambda dw: be.project_(dw, _dense(prev), _dense(bits), bound, max_bit)
    )


_project_op = torch.library.custom_op("blip::project_", mutates_args=("w",))(_project_impl)


@_project_op.register_fake
def _(w: Tensor, prev: Tensor, bits: Tensor, bound: float, max_bit: int) -> Tensor:
    return torch.empty((), dtype=torch.int64, device=w.device)


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
    be = _backend(w)
    return _inplace(
        [w, momentum_buf],
        lambda dw, dbuf: be.sgd_step_(
            dw, _dense(grad), _dense(prev), _dense(bits), dbuf, bound, max_bit,
            lr, momentum, dampening, nesterov, weight_decay,
        ),
    )


_sgd_op = torch.library.custom_op(
    "blip::constrained_sgd_step_", mutates_args=("w", "momentum_buf")
)(_sgd_impl)


@_sgd_op.register_fake
def _(w, grad, prev, bits, momentum_buf, bound, max_bit, lr, momentum, dampening, nesterov,
      weight_decay) -> Tensor:  # noqa: ANN001
    return torch.empty((), dtype=torch.int64, device=w.device)


def _update_bits_impl(
    bits: Tensor, fisher: Tensor, fisher_old: Tensor, task: int, max_bit: int
) -> None:
    be = _backend(bits)
    _inplace([bits, fisher, fisher_old], lambda b, f, fo: be.update_bits_(b, f, fo, task, max_bit))


_update_bits_op = torch.library.custom_op(
    "blip::update_bits_", mutates_args=("bits", "fisher", "fisher_old")
)(_update_bits_impl)


@_update_bits_op.register_fake
def _(bits: Tensor, fisher: Tensor, fisher_old: Tensor, task: int, max_bit: int) -> None:
    return None


def _sync_impl(w: Tensor, prev: Tensor, bits: Tensor, bound: float) -> None:
    be = _backend(w)
    _inplace([w, prev], lambda dw, dp: be.sync_(dw, dp, _dense(bits), bound))


_sync_op = torch.library.custom_op("blip::sync_", mutates_args=("w", "prev"))(_sync_impl)


@_sync_op.register_fake
def _(w: Tensor, prev: Tensor, bits: Tensor, bound: float) -> None:
    return None


def _fisher_linear_impl(
    fisher_w: Tensor, fisher_b: Tensor | None, x: Tensor, grad_out: Tensor, scale: float
) -> None:
    be = _backend(fisher_w)
    _inplace(
        [fisher_w, fisher_b],
        lambda fw, fb: be.fisher_linear_(fw, fb, _dense(x), _dense(grad_out), scale),
    )


_fisher_linear_op = torch.library.custom_op(
    "blip::fisher_linear_", mutates_args=("fisher_w", "fisher_b")
)(_fisher_linear_impl)


@_fisher_linear_op.register_fake
def _(fisher_w, fisher_b, x, grad_out, scale) -> None:  # noqa: ANN001
    return None


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
    be = _backend(fisher_w)
    _inplace(
        [fisher_w, fisher_b],
        lambda fw, fb: be.fisher_conv2d_(
            fw, fb, _dense(x), _dense(grad_out), tuple(stride), tuple(padding),
            tuple(dilation), groups, scale,
        ),
    )


_fisher_conv2d_op = torch.library.custom_op(
    "blip::fisher_conv2d_", mutates_args=("fisher_w", "fisher_b")
)(_fisher_conv2d_impl)


@_fisher_conv2d_op.register_fake
def _(fisher_w, fisher_b, x, grad_out, stride, padding, dilation, groups, scale) -> None:  # noqa: ANN001
    return None


# ---------------------------------------------------------------------------
# public API


def quantize(w: Tensor, bits: Tensor, bound: float) -> Tensor:
    """Section 1: ``rint(w/bound·2^bits)/2^bits·bound``, 0 where ``bits == 0`` (no gradient)."""
    _check_tensor("w", w, PARAM_DTYPES)
    _check_bound(bound)
    _check_tensor("bits", bits, (torch.uint8,), w.shape, w.device)
    w = w.detach()
    return (_quantize_impl if _direct(w, bits) else _quantize_op)(w, bits, float(bound))


def quantize_ste(w: Tensor, bits: Tensor, bound: float) -> Tensor:
    """:func:`quantize` whose backward passes the gradient through unchanged."""
    _check_tensor("w", w, PARAM_DTYPES)
    _check_bound(bound)
    _check_tensor("bits", bits, (torch.uint8,), w.shape, w.device)
    fn = _quantize_impl if not (w.requires_grad and torch.is_grad_enabled()) and _direct(
        w, bits) else _quantize_op
    return fn(w, bits, float(bound))


def project_(w: Tensor, prev: Tensor, bits: Tensor, bound: float, max_bit: int) -> Tensor:
    """Section 4 in place, for use after any optimizer (Adam...).

    Returns the number of NaN/Inf weights, which are reset to ``prev``.
    """
    _check_param_state(w, prev, bits, bound, max_bit)
    with _no_grad():
        fn = _project_impl if _direct(w, prev, bits) else _project_op
        return fn(w, prev, bits, float(bound), max_bit)


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

    ``validate=False`` skips the argument checks (≈10 µs of Python per call) for a
    caller that validated the same tensors before, as ConstrainedSGD does on the
    first step of each parameter.
    """
    if validate:
        _check_sgd_args(w, grad, prev, bits, bound, max_bit, lr, momentum_buf, momentum,
                        dampening, nesterov, weight_decay)
    with _no_grad():
        fn = _sgd_impl if _direct(w, grad, prev, bits, momentum_buf) else _sgd_op
        return fn(
            w, grad, prev, bits, momentum_buf if momentum != 0 else None, float(bound), max_bit,
            float(lr), float(momentum), float(dampening), bool(nesterov), float(weight_decay),
        )


def _check_sgd_args(
    w: Tensor, grad: Tensor, prev: Tensor, bits: Tensor, bound: float, max_bit: int, lr: float,
    momentum_buf: Tensor | None, momentum: float, dampening: float, nesterov: bool,
    weight_decay: float,
) -> None:
    _check_param_state(w, prev, bits, bound, max_bit)
    _check_tensor("grad", grad, (w.dtype,), w.shape, w.device)
    _check(math.isfinite(lr) and lr >= 0, f"lr must be a finite number >= 0; got {lr!r}")
    _check(0 <= momentum < 1, f"momentum must be in [0, 1); got {momentum!r}")
    _check(0 <= dampening <= 1, f"dampening must be in [0, 1]; got {dampening!r}")
    _check(
        math.isfinite(weight_decay) and weight_decay >= 0,
        f"weight_decay must be a finite number >= 0; got {weight_decay!r}",
    )
    _check(
        not nesterov or (momentum > 0 and dampening == 0),
        "nesterov requires momentum > 0 and dampening == 0",
    )
    if momentum != 0:
        _check(momentum_buf is not None, "momentum_buf is required when momentum != 0")
    if momentum_buf is not None:
        _check_tensor("momentum_buf", momentum_buf, (torch.float32,), w.shape, w.device)


def update_bits_(bits: Tensor, fisher: Tensor, fisher_old: Tensor, task: int, max_bit: int) -> None:
    """Sections 2 and 3 in one pass: grow ``bits``, fold ``fisher`` into ``fisher_old``, zero it."""
    _check_tensor("fisher", fisher, (torch.float32,))
    _check_tensor("fisher_old", fisher_old, (torch.float32,), fisher.shape, fisher.device)
    _check(isinstance(task, int) and task >= 0, f"task must be an int >= 0; got {task!r}")
    _check_max_bit(max_bit)
    _check_bits(bits, max_bit, fisher.shape, fisher.device)
    fn = _update_bits_impl if _direct(bits, fisher, fisher_old) else _update_bits_op
    fn(bits, fisher, fisher_old, task, max_bit)


def sync_(w: Tensor, prev: Tensor, bits: Tensor, bound: float) -> None:
    """Section 5: ``w = quantize(w, bits, bound)``; ``prev = w``."""
    _check_tensor("w", w, PARAM_DTYPES)
    _check_tensor("prev", prev, (torch.float32,), w.shape, w.device)
    _check_tensor("bits", bits, (torch.uint8,), w.shape, w.device)
    _check_bound(bound)
    with _no_grad():
        (_sync_impl if _direct(w, prev, bits) else _sync_op)(w, prev, bits, float(bound))


def _check_fisher_buffers(fisher_w: Tensor, fisher_b: Tensor | None, out_features: int) -> None:
    _check_tensor("fisher_w", fisher_w, (torch.float32,))
    if fisher_b is not None:
        _check_tensor("fisher_b", fisher_b, (torch.float32,), torch.Size([out_features]),
                      fisher_w.device)


def _check_scale(scale: float) -> None:
    _check(math.isfinite(scale), f"scale must be finite; got {scale!r}")


def fisher_linear_(
    fisher_w: Tensor, fisher_b: Tensor | None, x: Tensor, grad_out: Tensor, scale: float = 1.0
) -> None:
    """Add ``scale·Σ_n g_n²`` of a Linear layer's per-sample gradients to the buffers.

    ``x``: (N, in) or (N, L, in); ``grad_out``: the loss gradient w.r.t. the layer's
    output, (N, out) or (N, L, out). ``fisher_w``: (out, in); ``fisher_b``: (out,) or None.
    """
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
    _check_scale(scale)
    with _no_grad():
        fn = _fisher_linear_impl if _direct(fisher_w, fisher_b, x, grad_out) else _fisher_linear_op
        fn(fisher_w, fisher_b, x, grad_out, float(scale))


def _pair(name: str, v: int | Sequence[int]) -> list[int]:
    pair = [v, v] if isinstance(v, int) else list(v)
    _check(len(pair) == 2 and all(isinstance(i, int) for i in pair),
           f"{name} must be an int or a pair of ints; got {v!r}")
    return pair


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
    st, pad, dil = _pair("stride", stride), _pair("padding", padding), _pair("dilation", dilation)
    _check(all(s > 0 for s in st), f"stride must be positive; got {st}")
    _check(all(p >= 0 for p in pad), f"padding must be >= 0; got {pad}")
    _check(all(d > 0 for d in dil), f"dilation must be positive; got {dil}")
    _check_tensor("x", x, PARAM_DTYPES)
    _check(x.dim() == 4, f"x must be 4-D (N, C_in, H, W); got shape {tuple(x.shape)}")
    _check_tensor("fisher_w", fisher_w, (torch.float32,), device=x.device)
    _check(fisher_w.dim() == 4, f"fisher_w must be 4-D; got shape {tuple(fisher_w.shape)}")
    out_ch, cin_g, kh, kw = fisher_w.shape
    _check(isinstance(groups, int) and groups >= 1 and x.shape[1] % groups == 0
           and out_ch % groups == 0, f"groups={groups!r} must divide C_in and C_out")
    _check(cin_g * groups == x.shape[1],
           f"fisher_w has C_in/groups={cin_g} but x has C_in={x.shape[1]} with groups={groups}")
    ho = (x.shape[2] + 2 * pad[0] - dil[0] * (kh - 1) - 1) // st[0] + 1
    wo = (x.shape[3] + 2 * pad[1] - dil[1] * (kw - 1) - 1) // st[1] + 1
    _check_tensor("grad_out", grad_out, PARAM_DTYPES, torch.Size([x.shape[0], out_ch, ho, wo]),
                  x.device)
    _check_fisher_buffers(fisher_w, fisher_b, out_ch)
    _check_scale(scale)
    with _no_grad():
        fn = _fisher_conv2d_impl if _direct(fisher_w, fisher_b, x, grad_out) else _fisher_conv2d_op
        fn(fisher_w, fisher_b, x, grad_out, st, pad, dil, groups, float(scale))


__all__ = [
    "PARAM_DTYPES",
    "constrained_sgd_step_",
    "fisher_conv2d_",
    "fisher_linear_",
    "project_",
    "quantize",
    "quantize_ste",
    "sync_",
    "update_bits_",
    "value_checks",
]
