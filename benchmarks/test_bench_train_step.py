"""A full training step (forward, backward, optimizer step), BLIP against finetune.

BLIP's fused constrained step should cost at most ~5% over plain SGD ("finetune").
Two models, batch 64, one thread: the default MLP(64, 100, [10] * 10), where a step
is dominated by per-call Python overhead rather than by the kernels, and the
MNIST-5 preset's MLP(784, 1200×2, [2] * 5), where the arithmetic dominates.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch
import torch.nn.functional as F
from _bench import run

from blip.methods import make_method
from blip.models import MLP

BATCH = 64
MODELS = {
    "train_step/mlp64-100": (lambda: MLP(64, 100, [10] * 10), 64, 200),
    "train_step/mlp784-1200x2": (lambda: MLP(784, 1200, [2] * 5, n_hidden_layers=2), 784, 20),
}


@pytest.fixture
def one_thread() -> Iterator[None]:
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def make_step(method: str, group: str) -> Callable[[], None]:
    torch.manual_seed(0)
    build, in_features, _ = MODELS[group]
    m = make_method(method, build())
    net = m.prepare()
    opt = m.make_optimizer(0, 0.1)
    x, y = torch.randn(BATCH, in_features), torch.randint(0, 2, (BATCH,))

    def step() -> None:
        loss = F.cross_entropy(net(x, 0), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        m.after_step(0)

    for _ in range(50):  # first steps allocate momentum state and validate arguments
        step()
    return step


@pytest.mark.parametrize("group", list(MODELS))
@pytest.mark.parametrize("method", ["finetune", "blip"])
def test_train_step(benchmark, one_thread, method, group):  # noqa: ANN001
    step = make_step(method, group)
    n_steps = MODELS[group][2]  # per timed round

    def steps() -> None:
        for _ in range(n_steps):
            step()

    run(benchmark, steps, group, method, rounds=30, steps_per_round=n_steps)
