"""Which kernel backend a run uses, for its log line and results.json."""

from __future__ import annotations

import torch

import blip_kernels


def kernel_backend(device: torch.device | str) -> str:
    """Name of the blip_kernels backend that ops on ``device`` use now (honours
    ``BLIP_KERNELS_BACKEND`` and ``use_backend``): the one place both trainers ask."""
    return blip_kernels.current_backend(torch.device(device))


__all__ = ["kernel_backend"]
