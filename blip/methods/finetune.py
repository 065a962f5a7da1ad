"""``finetune``: plain SGD on everything, the forgetting baseline.

Reference: the BLIP authors' ``sgd`` baseline, github.com/Yujun-Shi/BLIP (commit 975e6dbc)
``miniImageNetClassification/src/approaches/sgd.py``: SGD over every parameter with the
run's momentum (their README runs the baselines with ``--momentum 0.0``), no weight decay,
no gradient clipping (its ``clipgrad`` is never used), cross-entropy on the task's head.
Followed as it is; the lr schedule and best-epoch restore are the trainer's.
"""

from __future__ import annotations

from .base import Method, register


@register
class Finetune(Method):
    """Plain SGD on everything: the forgetting baseline (the BLIP authors' ``sgd``)."""

    name = "finetune"
    # DDP-safe (README.md, "Distributed"): gradients only
    DISTRIBUTED = None
