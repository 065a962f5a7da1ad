"""``finetune``: plain SGD on everything, the forgetting baseline."""

from __future__ import annotations

from .base import Method, register


@register
class Finetune(Method):
    """Plain SGD on everything: the forgetting baseline."""

    name = "finetune"
    # DDP-safe (README.md, "Distributed"): gradients only
    DISTRIBUTED = None
