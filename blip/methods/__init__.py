"""Continual-learning methods, one file each, registered by import (see README.md here).

``make_method(name, model, **hparams)`` builds a registered method; :data:`METHODS` maps
every name to its class. The hook protocol is in :mod:`blip.methods.base`.
"""

# Importing a module registers its method; this order is the order `blip methods` lists them.
# isort: off
from . import finetune, freeze, blip, ewc, online_ewc, si, mas, imm, lwf, agem, hat, packnet
# isort: on
from .agem import AGEM
from .base import (
    METHODS,
    Method,
    make_method,
    method_class,
    method_names,
    register,
    tensor_bytes,
)
from .blip import BLIPMethod
from .ewc import EWC
from .finetune import Finetune
from .freeze import Freeze
from .hat import HAT
from .imm import IMMMode
from .lwf import LwF, distillation_loss
from .mas import MAS, mas_importance
from .online_ewc import OnlineEWC
from .packnet import PackNet
from .quadratic import QuadraticPenaltyMethod
from .si import SI
from .trunk import trunk_layers

__all__ = [
    "AGEM", "EWC", "HAT", "MAS", "METHODS", "SI", "BLIPMethod", "Finetune", "Freeze", "IMMMode",
    "LwF", "Method", "OnlineEWC", "PackNet", "QuadraticPenaltyMethod", "agem", "blip",
    "distillation_loss", "ewc", "finetune", "freeze", "hat", "imm", "lwf", "make_method", "mas",
    "mas_importance", "method_class", "method_names", "online_ewc", "packnet", "register", "si",
    "tensor_bytes", "trunk_layers",
]
