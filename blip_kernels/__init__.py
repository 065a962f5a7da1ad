"""Fused kernels for BLIP (Continual Learning via Bit-Level Information Preserving).

``import blip_kernels`` gives the ops of :mod:`blip_kernels.ops` and the backend
controls of :mod:`blip_kernels.backends` (``current_backend(device)`` names the backend
a run uses, for its records).
"""

from .backends import (
    BackendFallbackWarning,
    BackendUnavailableError,
    available_backends,
    current_backend,
    unavailable_reason,
    use_backend,
)
from .ops import (
    constrained_sgd_step_,
    constrained_sgd_step_foreach_,
    fisher_conv2d_,
    fisher_linear_,
    project_,
    quantize,
    quantize_ste,
    sync_,
    update_bits_,
    value_checks,
)

__version__ = "0.1.0"

__all__ = [
    "BackendFallbackWarning",
    "BackendUnavailableError",
    "available_backends",
    "constrained_sgd_step_",
    "constrained_sgd_step_foreach_",
    "current_backend",
    "fisher_conv2d_",
    "fisher_linear_",
    "project_",
    "quantize",
    "quantize_ste",
    "sync_",
    "unavailable_reason",
    "update_bits_",
    "use_backend",
    "value_checks",
]
