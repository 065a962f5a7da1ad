"""The wheel carries the licence (the LICENSE file and its SPDX expression)."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_wheel_carries_licence(tmp_path: Path) -> None:
    # No extension (BLIP_NO_EXT=1) and no dependencies: seconds, offline.
    env = {**os.environ, "BLIP_NO_EXT": "1"}
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps",
         "--no-index", str(ROOT), "-w", str(tmp_path)],
        check=True, env=env, capture_output=True, text=True,
    )
    (wheel,) = tmp_path.glob("blip-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        fields = z.read(metadata).decode().splitlines()
        (licence,) = [n for n in names if n.endswith(".dist-info/licenses/LICENSE")]
        text = z.read(licence).decode()
    assert "License-Expression: MIT" in fields
    assert text == (ROOT / "LICENSE").read_text() and text.startswith("MIT License")
