"""Quantized layers holding BLIP state, and :func:`convert` for any PyTorch model.

Every BLIP-constrained parameter ``p`` (a layer's ``weight`` and, when present,
``bias``) carries three resident buffers:

* ``prev_<p>``       fp32   the parameter as it stood (quantized) after the last task
* ``bits_<p>``       uint8  frozen most-significant bits per element, ``0..max_bit``
* ``fisher_old_<p>`` fp32   running average of earlier tasks' Fisher, initialised to
  ``F_prior * fan_in`` (the per-layer prior of docs/semantics.md, section 2)

That is 9 bytes per parameter. The Fisher accumulator ``fisher_<p>`` of the task
being ended exists only between :meth:`alloc_fisher_` (called by the Fisher
estimator) and :meth:`update_bits_`, which folds it into ``fisher_old`` and frees it.

Bounds: weights ``6/sqrt(fan_in)``, biases ``1.0`` (``fan_in`` = ``in_features``
or ``in_channels/groups * kh * kw``). All state math goes through
:mod:`blip_kernels`; this module only owns the buffers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import blip_kernels

from . import allocation, validate
from .allocation import Allocation

FORWARD_MODES = ("continuous", "quantized")
DEFAULT_MAX_BIT = 20
DEFAULT_F_PRIOR = 1e-15
BIAS_BOUND = 1.0


class Constraint(NamedTuple):
    """What the constrained update needs to know about one parameter."""

    param: nn.Parameter
    prev: Tensor
    bits: Tensor
    bound: float
    max_bit: int


def weight_bound(fan_in: int) -> float:
    """The authors' per-layer weight range ``6/sqrt(fan_in)``."""
    return 6.0 / math.sqrt(fan_in)


def blip_init_(layer: nn.Linear | nn.Conv2d) -> None:
    """The authors' initialisation: weight ~ N(0, 1/fan_in) clamped to ±bound, bias 0."""
    fan_in = layer.weight[0].numel()
    with torch.no_grad():
        layer.weight.normal_(0.0, math.sqrt(1.0 / fan_in))
        bound = weight_bound(fan_in)
        layer.weight.clamp_(-bound, bound)
        if layer.bias is not None:
            layer.bias.zero_()


def _check_config(max_bit: int, F_prior: float, forward_mode: str) -> None:
    if not (validate.is_int(max_bit) and 1 <= max_bit <= blip_kernels.ops.MAX_SUPPORTED_BIT):
        raise ValueError(
            f"max_bit must be an int in 1..{blip_kernels.ops.MAX_SUPPORTED_BIT}; got {max_bit!r}"
        )
    # the prior seeds F_old, a divisor of the bit gain: it must stay > 0 in float32
    validate.positive32("F_prior", F_prior)
    if forward_mode not in FORWARD_MODES:
        raise ValueError(f"forward_mode must be one of {FORWARD_MODES}; got {forward_mode!r}")


class _QuantMixin:
    """BLIP state and operations shared by :class:`QuantLinear` and :class:`QuantConv2d`.

    Mixed in before the torch layer class; ``_init_blip`` must run after the torch
    layer's ``__init__`` (which creates ``weight``/``bias``).
    """

    weight: nn.Parameter
    bias: nn.Parameter | None
    max_bit: int
    F_prior: float
    forward_mode: str
    fan_in: int
    weight_bound: float

    def _init_blip(self, max_bit: int, F_prior: float, forward_mode: str) -> None:
        _check_config(max_bit, F_prior, forward_mode)
        # name -> (layer, name) holding the state of a parameter shared with that layer
        self._tied: dict[str, tuple[nn.Module, str]] = {}
        self.max_bit = int(max_bit)
        self.F_prior = float(F_prior)
        self.forward_mode = forward_mode
        self.fan_in = self.weight[0].numel()
        self.weight_bound = weight_bound(self.fan_in)
        prior = self.F_prior * self.fan_in
        for name in self.blip_param_names():
            p = getattr(self, name)
            f32 = {"device": p.device, "dtype": torch.float32}
            self.register_buffer(f"prev_{name}", torch.zeros(p.shape, **f32))
            self.register_buffer(
                f"bits_{name}", torch.zeros(p.shape, device=p.device, dtype=torch.uint8)
            )
            self.register_buffer(f"fisher_old_{name}", torch.full(p.shape, prior, **f32))
            # transient: allocated by alloc_fisher_, freed by update_bits_/free_fisher_
            self.register_buffer(f"fisher_{name}", None, persistent=False)

    # -- introspection ------------------------------------------------------------------

    def blip_param_names(self) -> tuple[str, ...]:
        """The parameters whose BLIP state this layer holds: not the ones it shares with
        an earlier layer (:func:`convert` keeps ties), whose state lives there."""
        names = ("weight",) if self.bias is None else ("weight", "bias")
        tied = self.__dict__.get("_tied", {})
        return tuple(n for n in names if n not in tied)

    def fisher_accumulators(self) -> tuple[Tensor, Tensor | None]:
        """(weight, bias) Fisher accumulators this layer's samples add to: its own, or for
        a shared parameter the accumulator of the layer holding its state."""
        out: list[Tensor | None] = []
        for name in ("weight", "bias"):
            if getattr(self, name) is None:
                out.append(None)
                continue
            owner, oname = self.__dict__.get("_tied", {}).get(name, (self, name))
            acc = getattr(owner, f"fisher_{oname}")
            if acc is None:
                raise RuntimeError(f"no Fisher accumulator for {name!r}: the layer holding its "
                                   "state (it is shared) must be estimated with this one")
            out.append(acc)
        assert out[0] is not None
        return out[0], out[1]

    def bound_of(self, name: str) -> float:
        return self.weight_bound if name == "weight" else BIAS_BOUND

    def constraints(self) -> Iterator[tuple[str, Constraint]]:
        """(param name, :class:`Constraint`) for each constrained parameter, current buffers."""
        for name in self.blip_param_names():
            yield name, Constraint(
                getattr(self, name),
                getattr(self, f"prev_{name}"),
                getattr(self, f"bits_{name}"),
                self.bound_of(name),
                self.max_bit,
            )

    # -- forward ------------------------------------------------------------------------

    def _effective(self, name: str) -> Tensor | None:
        p = getattr(self, name)
        if p is None or self.forward_mode == "continuous":
            return p
        # "quantized": the forward sees the parameter on the max_bit grid, i.e. as the
        # max_bit fixed-point number the paper's algorithm stores. Using the frozen
        # `bits` instead would zero every still-free (bits == 0) element. The frozen
        # part (prev, on the coarser bits grid) is exactly representable there.
        full = torch.full(p.shape, self.max_bit, dtype=torch.uint8, device=p.device)
        return blip_kernels.quantize_ste(p, full, self.bound_of(name))

    # -- BLIP operations ----------------------------------------------------------------

    def project_(self) -> Tensor:
        """Section 4 on every constrained parameter; returns the count of reset NaN/Inf."""
        total = None
        for _, c in self.constraints():
            n = blip_kernels.project_(c.param, c.prev, c.bits, c.bound, c.max_bit)
            total = n if total is None else total + n
        assert total is not None
        return total

    def sync_(self) -> None:
        """Section 5: quantize each parameter to its bits and make it the new ``prev``."""
        for _, c in self.constraints():
            blip_kernels.sync_(c.param, c.prev, c.bits, c.bound)

    def alloc_fisher_(self) -> None:
        """Create zeroed fp32 Fisher accumulators (transient, 4 bytes per parameter)."""
        for name in self.blip_param_names():
            if getattr(self, f"fisher_{name}") is None:
                ref = getattr(self, f"prev_{name}")
                setattr(self, f"fisher_{name}", torch.zeros_like(ref))

    def free_fisher_(self) -> None:
        for name in self.blip_param_names():
            setattr(self, f"fisher_{name}", None)

    def update_bits_(self, task: int, rule: Allocation | None = None) -> None:
        """Sections 2 and 3 with this task's Fisher (``task`` counts ended tasks from 0):
        the authors' rule by the fused kernel, or an opt-in ``rule`` (blip.allocation).

        Frees the Fisher accumulators afterwards.
        """
        if not isinstance(task, int) or task < 0:
            raise ValueError(f"task must be an int >= 0; got {task!r}")
        for name in self.blip_param_names():
            fisher = getattr(self, f"fisher_{name}")
            if fisher is None:
                raise RuntimeError(
                    f"update_bits_: no Fisher estimate for {name!r}; run "
                    "blip.fisher.estimate_fisher_ (or alloc_fisher_ and fill it) first"
                )
            args = (getattr(self, f"bits_{name}"), fisher, getattr(self, f"fisher_old_{name}"),
                    task, self.max_bit)
            if rule is None or rule.is_authors:
                blip_kernels.update_bits_(*args)
            else:
                allocation.update_bits_(*args, rule)
        self.free_fisher_()

    def capacity(self) -> tuple[int, int]:
        """(sum of frozen bits, number of constrained parameters)."""
        total, count = 0, 0
        for name in self.blip_param_names():
            bits = getattr(self, f"bits_{name}")
            total += int(bits.sum(dtype=torch.int64))
            count += bits.numel()
        return total, count

    # -- module plumbing ----------------------------------------------------------------

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True):  # noqa: ANN202
        # prev / fisher buffers must stay fp32 whatever dtype the parameters are cast
        # to (model.half(), .to(bfloat16)); they only follow the weight's device.
        keep = {}
        for name in self.blip_param_names():
            for kind in ("prev", "fisher_old", "fisher"):
                key = f"{kind}_{name}"
                if self._buffers.get(key) is not None:
                    keep[key] = self._buffers[key]
                    self._buffers[key] = None
        try:
            out = super()._apply(fn, recurse)  # type: ignore[misc]
        finally:
            device = self.weight.device
            for key, buf in keep.items():
                self._buffers[key] = buf.to(device=device, dtype=torch.float32)
        return out

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # noqa: ANN001
        # Bits are trusted by the per-step kernels (value checks off), so check them once
        # here, where foreign data enters, and BEFORE anything is copied: a rejected
        # state leaves the layer as it was.
        for name in self.blip_param_names():
            self._check_incoming(state_dict, prefix, name)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)  # type: ignore[misc]

    def _check_incoming(self, state_dict: dict, prefix: str, name: str) -> None:
        bits = state_dict.get(f"{prefix}bits_{name}")
        if isinstance(bits, Tensor) and bits.numel():
            if bits.is_floating_point() or bits.is_complex() or bits.dtype == torch.bool:
                raise ValueError(f"{prefix}bits_{name} must hold integers; got {bits.dtype}")
            lo, hi = int(bits.min()), int(bits.max())
            if lo < 0 or hi > self.max_bit:
                raise ValueError(f"{prefix}bits_{name} holds values {lo}..{hi}, outside "
                                 f"0..max_bit={self.max_bit}")
        for kind in ("prev", "fisher_old"):
            t = state_dict.get(f"{prefix}{kind}_{name}")
            if isinstance(t, Tensor) and t.numel() and t.is_floating_point():
                bad = ~torch.isfinite(t.float())
                if kind == "fisher_old":
                    bad |= t < 0  # a running Fisher is a mean of squares
                if bool(bad.any()):
                    what = "not finite or negative" if kind == "fisher_old" else "not finite"
                    raise ValueError(f"{prefix}{kind}_{name} holds {int(bad.sum())} values that "
                                     f"are {what}")

    def extra_repr(self) -> str:
        base = super().extra_repr()  # type: ignore[misc]
        return (f"{base}, max_bit={self.max_bit}, F_prior={self.F_prior:g}, "
                f"forward_mode={self.forward_mode!r}")


class QuantLinear(_QuantMixin, nn.Linear):
    """``nn.Linear`` with BLIP state; initialised as the authors (see :func:`blip_init_`)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        max_bit: int = DEFAULT_MAX_BIT,
        F_prior: float = DEFAULT_F_PRIOR,
        forward_mode: str = "continuous",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        nn.Linear.__init__(self, in_features, out_features, bias, device=device, dtype=dtype)
        self._init_blip(max_bit, F_prior, forward_mode)

    def reset_parameters(self) -> None:
        blip_init_(self)

    def forward(self, input: Tensor) -> Tensor:
        return F.linear(input, self._effective("weight"), self._effective("bias"))


class QuantConv2d(_QuantMixin, nn.Conv2d):
    """``nn.Conv2d`` with BLIP state; initialised as the authors (see :func:`blip_init_`)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        *,
        max_bit: int = DEFAULT_MAX_BIT,
        F_prior: float = DEFAULT_F_PRIOR,
        forward_mode: str = "continuous",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        nn.Conv2d.__init__(
            self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
            bias, padding_mode, device=device, dtype=dtype,
        )
        self._init_blip(max_bit, F_prior, forward_mode)

    def reset_parameters(self) -> None:
        blip_init_(self)

    def forward(self, input: Tensor) -> Tensor:
        return self._conv_forward(input, self._effective("weight"), self._effective("bias"))


QUANT_TYPES = (QuantLinear, QuantConv2d)


def load_state_dict_atomic(module: nn.Module, state_dict: dict, strict: bool = True) -> None:
    """``module.load_state_dict`` that changes nothing when it fails: torch copies every
    entry that fits before reporting the ones that do not, so on any error the state as
    it was is put back (one copy of the state, only while loading)."""
    backup = {k: v.detach().clone() for k, v in module.state_dict().items()}
    try:
        module.load_state_dict(state_dict, strict=strict)
    except BaseException:
        module.load_state_dict(backup)
        raise


def is_quantized(module: nn.Module) -> bool:
    return isinstance(module, QUANT_TYPES)


def quantized_layers(model: nn.Module) -> Iterator[tuple[str, QuantLinear | QuantConv2d]]:
    """(qualified name, layer) for every quantized layer of ``model``."""
    for name, m in model.named_modules():
        if isinstance(m, QUANT_TYPES):
            yield name, m


def _excluded(name: str, exclude: Iterable[str]) -> bool:
    return any(name == e or name.startswith(e + ".") for e in exclude)


def _swap(old: nn.Module, layer_kwargs: dict) -> nn.Module | None:
    # Exact types only: subclasses may not route their weights through forward()
    # (MultiheadAttention's out_proj is one), so BLIP could neither see their
    # activations for the Fisher nor quantize their forward.
    if type(old) not in (nn.Linear, nn.Conv2d):
        return None
    factory = {"device": old.weight.device, "dtype": old.weight.dtype}
    if type(old) is nn.Linear:
        new: nn.Module = QuantLinear(
            old.in_features, old.out_features, old.bias is not None, **layer_kwargs, **factory
        )
    elif type(old) is nn.Conv2d:
        new = QuantConv2d(
            old.in_channels, old.out_channels, old.kernel_size, old.stride, old.padding,
            old.dilation, old.groups, old.bias is not None, old.padding_mode,
            **layer_kwargs, **factory,
        )
    with torch.no_grad():
        new.weight.copy_(old.weight)
        new.weight.requires_grad_(old.weight.requires_grad)
        if old.bias is not None:
            new.bias.copy_(old.bias)
            new.bias.requires_grad_(old.bias.requires_grad)
    new.train(old.training)
    return new


def _tie(layer: _QuantMixin, name: str, owner: _QuantMixin, owner_name: str) -> None:
    """Make ``layer.<name>`` the very Parameter ``owner.<owner_name>``, whose BLIP state
    (prev, bits, running Fisher) stays with ``owner``: one parameter, one state."""
    setattr(layer, name, getattr(owner, owner_name))
    for kind in ("prev", "bits", "fisher_old", "fisher"):
        del layer._buffers[f"{kind}_{name}"]  # type: ignore[attr-defined]
    layer._tied[name] = (owner, owner_name)


def _why_not(module: nn.Module) -> str:
    """Why convert leaves a module holding parameters as it is (for the warning)."""
    from torch.nn.utils import parametrize

    if parametrize.is_parametrized(module):
        return "parametrized: its weight is computed, there is no tensor to constrain"
    if isinstance(module, nn.modules.lazy.LazyModuleMixin):
        return "lazy: not initialised yet; run a forward before convert"
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        return "a subclass: its forward may bypass the weight"
    return "no quantized version"


def convert(
    model: nn.Module, exclude: Iterable[str] | str = (), *, strict: bool = False,
    **layer_kwargs: object,
) -> nn.Module:
    """Swap every ``nn.Linear``/``nn.Conv2d`` of ``model`` (in place, recursively) for
    :class:`QuantLinear`/:class:`QuantConv2d`, copying weights and bias.

    ``exclude``: qualified module names to leave alone, an entry also covering
    everything under it (``"heads"`` excludes ``heads.0``, ``heads.1``...).
    ``layer_kwargs`` (``max_bit``, ``F_prior``, ``forward_mode``) go to the new layers.
    Already-quantized layers are left as they are. Tied parameters stay tied: a weight
    shared by two layers stays one parameter whose BLIP state is held by the first
    layer (the Fisher of a weight used twice in one forward is refused at estimation).
    Every other module outside ``exclude`` that holds parameters (Conv1d, Conv3d,
    ConvTranspose*, lazy, parametrized layers, subclasses of Linear/Conv2d, norms,
    embeddings, a Linear sharing its weight with one of them...) would train without
    protection: they are named in one warning, or a ``ValueError`` with ``strict=True``.
    Weights are copied, not re-initialised: weights outside the BLIP bound are clamped
    by the first projection. Convert before creating the optimizer. Returns ``model``
    (a bare Linear/Conv2d passed as ``model`` is returned converted).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module; got {type(model).__name__}")
    if not isinstance(strict, bool):
        raise TypeError(f"strict must be a bool; got {strict!r}")
    if isinstance(exclude, str):
        exclude = (exclude,)
    exclude = tuple(exclude)
    unknown = set(layer_kwargs) - {"max_bit", "F_prior", "forward_mode"}
    if unknown:
        raise TypeError(f"convert got unexpected layer_kwargs {sorted(unknown)}")
    modules = dict(model.named_modules())  # each module once, under its first name
    users: dict[int, list[str]] = {}  # parameter -> modules holding it
    for mname, m in modules.items():
        for p in m._parameters.values():
            if p is not None:
                users.setdefault(id(p), []).append(mname)
    will_swap = {n for n, m in modules.items() if type(m) in (nn.Linear, nn.Conv2d)
                 and not _excluded(n, exclude)}
    quantized = {n for n, m in modules.items() if is_quantized(m)}
    left: dict[str, str] = {}  # module name -> why it is not converted
    changed = True
    while changed:  # a tie to a module that stays unconverted keeps this one unconverted
        changed = False
        for n in sorted(will_swap):
            others = {u for p in modules[n]._parameters.values() if p is not None
                      for u in users[id(p)]} - will_swap - quantized
            if others:
                other = sorted(others)[0]
                will_swap.discard(n)
                left[n] = (f"shares a parameter with {other or '<model>'} "
                           f"({type(modules[other]).__name__}), which is not quantized")
                changed = True
    for n, m in modules.items():
        if n in will_swap or n in quantized or n in left or _excluded(n, exclude):
            continue
        if any(True for _ in m.parameters(recurse=False)):
            left[n] = _why_not(m)
    if left:
        listed = "; ".join(f"{n or '<model>'} ({type(modules[n]).__name__}: {why})"
                           for n, why in sorted(left.items()))
        msg = (f"blip.convert: {len(left)} module(s) holding parameters are not quantized, "
               f"so BLIP does not protect them: {listed}. Exclude them (exclude=...) if "
               "that is intended")
        if strict:
            raise ValueError(msg + " (strict=True)")
        import warnings

        warnings.warn(msg, UserWarning, stacklevel=2)

    # parameter -> (quantized layer, name) holding its BLIP state
    holder: dict[int, tuple[_QuantMixin, str]] = {}
    for n in quantized:
        layer = modules[n]
        for pname in layer.blip_param_names():
            holder.setdefault(id(getattr(layer, pname)), (layer, pname))
    swapped: dict[int, nn.Module] = {}  # a module shared in two places stays shared

    def swap(old: nn.Module) -> nn.Module | None:
        new = _swap(old, layer_kwargs)
        if new is None:
            return None
        for pname in ("weight", "bias"):
            old_p = getattr(old, pname)
            if old_p is None:
                continue
            if id(old_p) in holder:
                owner, oname = holder[id(old_p)]
                if owner.max_bit != new.max_bit:
                    raise ValueError(f"a {type(old).__name__} shares its {pname} with a layer "
                                     f"quantized with max_bit={owner.max_bit}; "
                                     f"got max_bit={new.max_bit}")
                _tie(new, pname, owner, oname)
            else:
                holder[id(old_p)] = (new, pname)
        return new

    def visit(module: nn.Module, prefix: str) -> None:
        # _modules, not named_children(): the latter hides a module's second occurrence
        for child_name, child in list(module._modules.items()):
            if child is None:
                continue
            name = f"{prefix}.{child_name}" if prefix else child_name
            if _excluded(name, exclude) or is_quantized(child):
                continue
            if id(child) in swapped:
                setattr(module, child_name, swapped[id(child)])
                continue
            new = swap(child) if name in will_swap else None
            if new is not None:
                swapped[id(child)] = new
                setattr(module, child_name, new)
            else:
                visit(child, name)

    if "" in will_swap:
        root = swap(model)
        if root is not None:
            return root
    visit(model, "")
    return model


__all__ = [
    "BIAS_BOUND",
    "Constraint",
    "FORWARD_MODES",
    "QuantConv2d",
    "QuantLinear",
    "blip_init_",
    "convert",
    "is_quantized",
    "load_state_dict_atomic",
    "quantized_layers",
    "weight_bound",
]
