"""The README's Python example runs as written (with a tiny task stream supplied)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
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


def _section(title: str) -> str:
    text = README.read_text()
    start = text.index(f"## {title}")
    end = text.find("\n## ", start + 1)
    return text[start:] if end < 0 else text[start:end]


def test_readme_safety_section_examples_run(capsys: pytest.CaptureFixture[str]) -> None:
    section = _section("What is checked and what is trusted")
    (code,) = re.findall(r"```python\n(.*?)```", section, re.S)
    exec(compile(code, str(README), "exec"), {"__name__": "readme"})  # noqa: S102
    printed = capsys.readouterr().out.strip().splitlines()
    assert "this would have run" not in printed  # the payload did not run ...
    assert len(printed) == 1 and "data_batch_1: refusing" in printed[0]  # ... it was named
    (shell,) = re.findall(r"```bash\n(.*?)```", section, re.S)
    from blip.cli import _parser

    commands = [shlex.split(line.split("#")[0]) for line in shell.strip().splitlines()]
    assert commands and all(c[0] == "blip" for c in commands)
    for argv in commands:  # every flag shown exists (the data and the run are the reader's)
        assert _parser().parse_args(argv[1:]).trust_pickles is True
