"""BLIP: continual learning via Bit-Level Information Preserving (CVPR 2021).

``blip.convert(model)`` quantizes any model's Linear/Conv2d layers; :class:`BLIP`
drops the method into one's own training loop; :mod:`blip.models` holds the
multi-head benchmark networks. Lazy (PEP 562): ``import blip`` imports nothing heavy,
torch comes with the first name used, so ``blip --help`` answers without it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the core module that defines it
_LAZY = {
    "BLIP": "strategy",
    "ConstrainedSGD": "optim",
    "QuantConv2d": "nn",
    "QuantLinear": "nn",
    "convert": "nn",
    "project_model_": "optim",
    "quantized_layers": "nn",
}

if TYPE_CHECKING:  # for type checkers and IDEs; at run time __getattr__ resolves these
    from . import models
    from .nn import QuantConv2d, QuantLinear, convert, quantized_layers
    from .optim import ConstrainedSGD, project_model_
    from .strategy import BLIP

__all__ = [
    "BLIP",
    "ConstrainedSGD",
    "QuantConv2d",
    "QuantLinear",
    "convert",
    "models",
    "project_model_",
    "quantized_layers",
]


def __getattr__(name: str) -> Any:
    if name == "models":
        return importlib.import_module(".models", __name__)
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'blip' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
