"""The GPU script's build step: ``setup.py build_ext --inplace`` with what is installed,
nothing fetched from a network.

    python3 benchmarks/gpu/build_ext.py [--wheels DIR]

pyproject.toml declares its licence the PEP 639 way (``license = "MIT"``), which
setuptools reads from version 77 on; an older one stops ``setup.py`` before it compiles
anything. So first the installed setuptools is checked: when it is older than 77, a
setuptools wheel from ``--wheels`` (default ``.whl/`` in the repository root, the folder
the device tool's ``carry`` brings) is unpacked into a private folder put first on
PYTHONPATH for the build alone (``pip install --no-index --no-deps --target``: no
network, the interpreter's own packages untouched); without one the step fails saying so.
The environment's BLIP_CUDA / BLIP_CUDA_ARCH / MAX_JOBS pass through to setup.py.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MIN_SETUPTOOLS = (77, 0)


def version_tuple(text: str) -> tuple[int, int]:
    m = re.match(r"(\d+)(?:\.(\d+))?", text)
    if m is None:
        raise ValueError(f"not a version: {text!r}")
    return int(m.group(1)), int(m.group(2) or 0)


def installed_setuptools() -> str | None:
    try:
        return importlib.metadata.version("setuptools")
    except importlib.metadata.PackageNotFoundError:
        return None


def newest_wheel(folder: Path) -> Path | None:
    """The setuptools wheel of the highest version >= 77 in ``folder``, if any."""
    found = []
    for whl in folder.glob("setuptools-*.whl"):
        try:
            v = version_tuple(whl.name.split("-")[1])
        except ValueError:
            continue
        if v >= MIN_SETUPTOOLS:
            found.append((v, whl))
    return max(found)[1] if found else None


def build_env(wheels: Path, scratch: Path, have: str | None) -> dict[str, str]:
    """The environment for setup.py: this one, plus a newer setuptools when needed."""
    env = dict(os.environ)
    if have is not None and version_tuple(have) >= MIN_SETUPTOOLS:
        print(f"setuptools {have}: new enough (>= 77)", flush=True)
        return env
    whl = newest_wheel(wheels)
    why = f"setuptools {have or '(none)'} is installed, but pyproject.toml needs >= 77"
    if whl is None:
        raise SystemExit(
            f"error: {why}, and {wheels} holds no setuptools-77-or-later wheel; download one "
            f"where pip works (python3 -m pip download --no-deps 'setuptools>=77,<82' -d .whl) "
            "and carry .whl")
    site = scratch / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                    "--no-compile", "--target", str(site), str(whl)], check=True)
    print(f"{why}: building with {whl.name} (unpacked to {site})", flush=True)
    env["PYTHONPATH"] = os.pathsep.join([str(site)] + ([env["PYTHONPATH"]]
                                                       if env.get("PYTHONPATH") else []))
    return env


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--wheels", type=Path, default=ROOT / ".whl")
    args = ap.parse_args(argv)
    shown = {k: os.environ.get(k) for k in ("BLIP_CUDA", "BLIP_CUDA_ARCH", "MAX_JOBS")}
    print("build:", " ".join(f"{k}={v}" for k, v in shown.items() if v is not None),
          sys.executable, "setup.py build_ext --inplace", flush=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="blip-build-") as scratch:
        env = build_env(args.wheels, Path(scratch), installed_setuptools())
        proc = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=ROOT,
                              env=env, check=False)
    print(f"build: exit {proc.returncode} in {time.perf_counter() - t0:.1f} s", flush=True)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
