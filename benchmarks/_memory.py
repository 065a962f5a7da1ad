"""Peak extra host memory of one call, measured in a fresh process.

CPU tensors come from malloc, and large blocks are mmapped and returned on free,
so the growth of the process's resident-set high-water mark across a single call
is the call's peak extra memory. Linux resets that mark on writing 5 to
/proc/self/clear_refs; the inputs are allocated and the op warmed up on a tiny
shape before it is reset and the baseline read.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch

    def status(key):
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith(key + ":"))

    torch.manual_seed(0)
    sys.path.insert(0, {bench_dir!r})
    import fisher_cases as fc
    fn, warm = fc.CASES[{case!r}]({variant!r})
    warm()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = status("VmRSS")
    fn()
    peak = status("VmHWM")
    print(json.dumps({{"extra_kib": peak - base}}))
    """
)


def peak_extra_mb(case: str, variant: str) -> float:
    """Peak extra MB of ``fisher_cases.CASES[case](variant)`` in a new interpreter."""
    import pathlib

    bench_dir = str(pathlib.Path(__file__).parent)
    script = _SCRIPT.format(bench_dir=bench_dir, case=case, variant=variant)
    repo_root = str(pathlib.Path(__file__).parent.parent)  # importable without an install
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True, timeout=600, cwd=repo_root)
    return json.loads(out.stdout.strip().splitlines()[-1])["extra_kib"] / 1024
