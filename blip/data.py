"""Public alias of :mod:`blip.classification.data` (``blip.data.load_benchmark`` predates the
layout; the code lives there)."""

from .classification.data import (
    BENCHMARKS,
    DataFormatError,
    TaskData,
    TaskStream,
    load_benchmark,
    read_cifar_batch,
    read_idx,
    split_valid,
)

__all__ = [
    "BENCHMARKS", "DataFormatError", "TaskData", "TaskStream", "load_benchmark",
    "read_cifar_batch", "read_idx", "split_valid",
]
