"""A full training step (forward, backward, optimizer step) on the default model.

BLIP's fused constrained step must cost at most ~5% over plain SGD ("finetune")
on the default model: MLP(64, 100, [10] * 10), batch 64, one thread, where the
step is dominated by per-call Python overhead rather than by the kernels.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch
import torch.nn.functional as F
from _bench import run

from blip.methods import make_method
from blip.models import MLP

GROUP = "train_step/mlp64-100"
STEPS = 200  # per timed round: one step is well under a millisecond


@pytest.fixture
def one_thread() -> Iterator[None]:
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def make_step(method: str) -> Callable[[], None]:
    torch.manual_seed(0)
    m = make_method(method, MLP(64, 100, [10] * 10))
    net = m.prepare()
    opt = m.make_optimizer(0, 0.1)
    x, y = torch.randn(64, 64), torch.randint(0, 10, (64,))

    def step() -> None:
        loss = F.cross_entropy(net(x, 0), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        m.after_step(0)

    for _ in range(50):  # first steps allocate momentum state and validate arguments
        step()
    return step


@pytest.mark.parametrize("method", ["finetune", "blip"])
def test_train_step(benchmark, one_thread, method):  # noqa: ANN001
    step = make_step(method)

    def steps() -> None:
        for _ in range(STEPS):
            step()

    run(benchmark, steps, GROUP, method, rounds=30, steps_per_round=STEPS)
