"""BLIP: continual learning via Bit-Level Information Preserving (CVPR 2021).

``blip.convert(model)`` quantizes any model's Linear/Conv2d layers; :class:`BLIP`
drops the method into one's own training loop; :mod:`blip.models` holds the
multi-head benchmark networks. Kept light: importing it pulls in torch only.
"""

from . import models
from .nn import QuantConv2d, QuantLinear, convert, quantized_layers
from .optim import ConstrainedSGD, project_model_
from .strategy import BLIP

__version__ = "0.1.0"

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
