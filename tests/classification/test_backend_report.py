"""A run says which kernel backend it used; a broken `_C` is one warning with reason and fix.

The broken build is a copy of the package whose `_C` library is not a loadable shared
object (a failed or foreign build), so the import really fails, as on a user's machine.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent.parent
ARGS = ["train", "--n-tasks", "1", "--epochs", "1", "--no-plots", "--method", "blip"]


def _train(pythonpath: Path, out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(pythonpath), "PYTHONWARNINGS": "default"}
    env.pop("BLIP_KERNELS_BACKEND", None)
    return subprocess.run([sys.executable, "-m", "blip", *ARGS, "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=600,
                          cwd=out.parent)


def test_unloadable_extension_warns_once_and_the_run_reports_reference(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    for pkg in ("blip", "blip_kernels"):
        shutil.copytree(ROOT / pkg, tree / pkg,
                        ignore=shutil.ignore_patterns("__pycache__", "_C*.so"))
    ext = next((ROOT / "blip_kernels").glob("_C*.so"), None)
    name = ext.name if ext else "_C" + sysconfig.get_config_var("EXT_SUFFIX")
    (tree / "blip_kernels" / name).write_bytes(b"not a shared object")
    out = tmp_path / "run"
    proc = _train(tree, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    warned = [line for line in proc.stderr.splitlines() if "BackendFallbackWarning" in line]
    assert len(warned) == 1, proc.stderr[-3000:]
    msg = warned[0]
    assert "'reference' backend" in msg and "does not load" in msg
    assert "ImportError" in msg and name in msg  # the reason, naming the broken file
    assert "pip install --no-build-isolation -e ." in msg  # the fix
    log = (proc.stdout + proc.stderr).splitlines()
    (first,) = [line for line in log if "kernels " in line and "seed" in line]
    assert "kernels reference" in first
    assert json.loads((out / "results.json").read_text())["kernel_backend"] == "reference"


def test_a_working_extension_is_reported_and_silent(tmp_path: Path) -> None:
    from blip_kernels import backends

    if backends.unavailable_reason("cpp", "cpu") is not None:
        pytest.skip("the native extension is not built here (BLIP_NO_EXT=1)")
    out = tmp_path / "run"
    proc = _train(ROOT, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "BackendFallbackWarning" not in proc.stderr
    assert "kernels cpp" in proc.stdout + proc.stderr
    assert json.loads((out / "results.json").read_text())["kernel_backend"] == "cpp"
