"""The README's Python example runs as written (with a tiny task stream supplied)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).parent.parent / "README.md"


def test_readme_example_runs():
    text = README.read_text()
    block = re.search(r"```python\n(.*?)```", text, re.S)
    assert block is not None, "README lost its Python example"
    g = torch.Generator().manual_seed(0)
    tasks = [(torch.rand(60, 64, generator=g), torch.randint(0, 10, (60,), generator=g))
             for _ in range(2)]

    def batches(x, y, size=20):  # noqa: ANN001, ANN202
        for i in range(0, len(x), size):
            yield x[i : i + size], y[i : i + size]

    scope = {"tasks": tasks, "batches": batches, "print": lambda *a: scope.update(out=a)}
    exec(compile(block.group(1), str(README), "exec"), scope)  # noqa: S102
    capacity = scope["out"][0]
    assert 0.0 < capacity["overall"] <= 1.0
    assert set(capacity["layers"]) == {name for name, _ in
                                       __import__("blip").quantized_layers(scope["model"])}
