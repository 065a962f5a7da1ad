"""What a command imports (issue 13 item 6, issue 18): `blip --help` and `import blip` pull in
no torch, pdigits needs no sklearn import, a BLIP run never imports torch._dynamo, and the
public names still resolve. Checked in fresh interpreters (sys.modules), not by timing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "sklearn", "matplotlib", "torch._dynamo", "tqdm")


def _loaded_after(code: str) -> dict[str, bool]:
    """Run ``code`` in a fresh interpreter; which of HEAVY it left in sys.modules."""
    probe = (f"{code}\nimport json, sys\n"
             f"print(json.dumps({{m: m in sys.modules for m in {HEAVY!r}}}))")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=300, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_import_blip_imports_no_torch() -> None:
    loaded = _loaded_after("import blip")
    assert not any(loaded.values()), loaded


@pytest.mark.parametrize("argv", [["--help"], [], ["no-such-command"]])
def test_blip_help_imports_no_torch(argv: list[str]) -> None:
    code = ("import sys, runpy\n"
            f"sys.argv = ['blip', *{argv!r}]\n"
            "try:\n    runpy.run_module('blip', run_name='__main__')\n"
            "except SystemExit:\n    pass")
    loaded = _loaded_after(code)
    assert not any(loaded.values()), loaded


def test_blip_help_lists_every_command() -> None:
    from blip.cli import COMMANDS, _parser

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "blip", "--help"], capture_output=True,
                         text=True, env=env, cwd=ROOT, timeout=120, check=True).stdout
    full = _parser()
    (sub,) = [a for a in full._actions if a.dest == "command"]
    assert set(COMMANDS) == set(sub.choices)  # the light parser knows every command
    for name in COMMANDS:
        assert name in out


def test_public_names_resolve_lazily() -> None:
    import blip
    from blip.nn import convert
    from blip.strategy import BLIP

    assert blip.convert is convert and blip.BLIP is BLIP
    assert {"BLIP", "ConstrainedSGD", "convert", "models"} <= set(dir(blip))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = blip.nope


def test_pdigits_loads_without_importing_sklearn_and_blip_runs_without_dynamo() -> None:
    pytest.importorskip("sklearn")
    code = (
        "import torch\n"
        "from blip.classification.data import load_benchmark\n"
        "from blip.methods import make_method\n"
        "from blip.models import MLP\n"
        "s = load_benchmark('pdigits', None, False, 0)\n"
        "m = make_method('blip', MLP(64, 100, [10] * 10)); net = m.prepare()\n"
        "opt = m.make_optimizer(0, 0.1)\n"
        "x, y = s[0].inputs(s[0].x_train[:16]), s[0].y_train[:16]\n"
        "for _ in range(2):\n"
        "    loss = m.training_loss(net, x, y, 0); opt.zero_grad(); loss.backward(); opt.step()\n"
        "opt.zero_grad(set_to_none=False)\n"
        "m.after_task(0, x, y)\n"
    )
    loaded = _loaded_after(code)
    assert loaded["torch"]
    assert not loaded["sklearn"] and not loaded["torch._dynamo"], loaded


def test_digits_read_directly_equal_sklearn() -> None:
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    from blip.classification.data.embedded import _digits, _digits_file

    assert _digits_file() is not None  # the direct read is the path taken here
    x, y = _digits()
    d = sklearn_datasets.load_digits()
    assert torch.equal(x, torch.tensor(d.data, dtype=torch.float32) / 16.0)
    assert torch.equal(y, torch.tensor(d.target, dtype=torch.long))


def test_constrained_sgd_zero_grad_as_torch_and_labelled_under_a_profiler() -> None:
    from blip.methods import make_method
    from blip.models import MLP

    m = make_method("blip", MLP(4, 5, [2]))
    net = m.prepare()
    opt = m.make_optimizer(0, 0.1)
    net(torch.randn(3, 4), 0).sum().backward()
    opt.zero_grad(set_to_none=False)
    grads = [p.grad for p in net.parameters()]
    assert all(g is not None and not g.any() for g in grads)
    net(torch.randn(3, 4), 0).sum().backward()
    assert [p.grad for p in net.parameters()] == grads  # accumulated into the same tensors
    opt.zero_grad()
    assert all(p.grad is None for p in net.parameters())
    net(torch.randn(3, 4), 0).sum().backward()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        opt.zero_grad()
    assert any("zero_grad" in e.name for e in prof.events())  # torch's label when listened to
    assert all(p.grad is None for p in net.parameters())
