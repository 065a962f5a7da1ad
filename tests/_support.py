"""Helpers shared by test modules (importable because pytest puts tests/ on sys.path)."""

from __future__ import annotations

import os

import torch

import blip_kernels

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def backend_device_pairs() -> list[tuple[str, str]]:
    """Every (backend, device) pair that can run here (``BLIP_TEST_BACKENDS=a,b`` narrows it)."""
    only = os.environ.get("BLIP_TEST_BACKENDS")
    names = only.split(",") if only else blip_kernels.backends.NAMES
    return [
        (b, d) for d in DEVICES for b in names if blip_kernels.unavailable_reason(b, d) is None
    ]


class Crash(Exception):
    """Raised by :func:`run_killed_then_resumed`'s trainer before the last task."""


def run_killed_then_resumed(cfg, stream, tmp_path) -> tuple[dict, dict]:  # noqa: ANN001
    """Run ``cfg`` whole, then again but dying before its last task and resumed from the
    checkpoint. Returns (the whole run's results, the resumed run's results)."""
    from blip.classification.trainer import Trainer

    class Crashing(Trainer):
        def train_task(self, net, method, task, t):  # noqa: ANN001, ANN202
            if t == len(stream.tasks) - 1:
                raise Crash
            return super().train_task(net, method, task, t)

    full = Trainer(cfg, tmp_path / "full", quiet=True, plots=False, stream=stream).run()
    try:
        Crashing(cfg, tmp_path / "cut", quiet=True, plots=False, stream=stream).run()
    except Crash:
        pass
    else:
        raise AssertionError("the crashing run did not reach its last task")
    resumed = Trainer(cfg, tmp_path / "cut", quiet=True, plots=False, stream=stream).run(
        resume=True)
    return full, resumed
