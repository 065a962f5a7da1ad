"""Registers, spills and subroutine calls of every kernel in a CUDA source, per arch.

    python3 benchmarks/gpu/ptxas_report.py [--arch 80,90] [csrc/cuda/fisher.cu ...]

Compiles each source with the extension's flags plus ``-Xptxas -v`` (no GPU needed),
then counts the SASS subroutine calls of each kernel with ``cuobjdump`` (the
toolkit's, or the one Triton's package ships). Calls to the very next instruction
are sm_80's loop-exit idiom, not subroutines, and are not counted; what remains
are the software routines for 64-bit integer ``/`` and ``%``.
Prints a markdown table; exits 1 when a source fails to compile, or with
``--fail-on-spill`` when any kernel has spill stores or loads (CI's gate).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FLAGS = ["--fmad=false", "-std=c++17", "-O3", "-Werror", "all-warnings"]
_ENTRY = re.compile(r"Compiling entry function '(\w+)' for 'sm_(\w+)'")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")
_CALL = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?CALL\.\S+\s+(0x[0-9a-f]+)")


def _cuobjdump() -> str | None:
    found = shutil.which("cuobjdump")
    if found:
        return found
    try:
        import triton  # noqa: PLC0415 - optional: only for its bundled cuobjdump

        tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        return str(tool) if tool.exists() else None
    except ImportError:
        return None


def _demangle(name: str) -> str:
    """persample_fisher_kernel<float, true, int> from its mangled name (enough for a table)."""
    m = re.search(r"\d+([a-z_]+_kernel)I(.+?)EEv", name)
    if not m:
        return name
    args = m.group(2)
    names = {"f": "float", "6__half": "half", "13__nv_bfloat16": "bf16"}
    dtype = next((v for k, v in names.items() if args.startswith(k)), "?")
    rest = args[len(next((k for k in names if args.startswith(k)), "")):]
    parts = [dtype]
    if rest.startswith("Lb1E"):
        parts.append("conv")
        rest = rest[4:]
    elif rest.startswith("Lb0E"):
        parts.append("linear")
        rest = rest[4:]
    if rest[:1] in ("i", "l"):
        parts.append("int32" if rest[0] == "i" else "int64")
    return f"{m.group(1)}<{', '.join(parts)}>"


def subroutine_calls(sass: str) -> dict[str, int]:
    calls: dict[str, int] = {}
    fn = None
    for line in sass.splitlines():
        if "Function :" in line:
            fn = line.split("Function :")[1].strip()
            calls[fn] = 0
            continue
        m = _CALL.search(line)
        if m and fn is not None and int(m.group(2), 16) - int(m.group(1), 16) > 0x20:
            calls[fn] += 1
    return calls


def report(src: Path, arch: str, nvcc: str, cuobjdump: str | None) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        obj = Path(tmp) / "k.o"
        proc = subprocess.run(
            [nvcc, f"-arch=sm_{arch}", *FLAGS, "-I", str(ROOT / "csrc" / "cuda"),
             "-Xptxas", "-v", "-c", str(src), "-o", str(obj)],
            capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"nvcc failed on {src} for sm_{arch}:\n{proc.stderr}")
        calls = {}
        if cuobjdump:
            sass = subprocess.run([cuobjdump, "-sass", str(obj)], capture_output=True,
                                  text=True, check=True).stdout
            calls = subroutine_calls(sass)
    rows, cur = [], None
    for line in proc.stderr.splitlines():
        if m := _ENTRY.search(line):
            cur = {"kernel": m.group(1), "arch": f"sm_{m.group(2)}"}
        elif cur and (m := _SPILL.search(line)):
            cur.update(stack=int(m.group(1)), spill_st=int(m.group(2)), spill_ld=int(m.group(3)))
        elif cur and (m := _REGS.search(line)):
            cur["regs"] = int(m.group(1))
            cur["calls"] = calls.get(cur["kernel"])
            rows.append(cur)
            cur = None
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sources", nargs="*", type=Path,
                    default=[ROOT / "csrc" / "cuda" / "fisher.cu"])
    ap.add_argument("--arch", default="80,90", help="comma-separated sm numbers")
    ap.add_argument("--nvcc", default=None, help="nvcc to use (default: the toolkit found "
                    "as setup.py finds it)")
    ap.add_argument("--fail-on-spill", action="store_true",
                    help="exit 1 when any kernel spills registers")
    args = ap.parse_args(argv)
    nvcc = args.nvcc
    if nvcc is None:
        sys.path.insert(0, str(ROOT / "csrc" / "cuda"))
        import toolkit  # noqa: PLC0415 - csrc/cuda/toolkit.py, not a package

        found = toolkit.find_toolkit()
        if isinstance(found, str):
            print(found, file=sys.stderr)
            return 1
        nvcc = str(found.nvcc)
    cuobjdump = _cuobjdump()
    spilled = []
    print("| source | kernel | arch | registers | stack B | spill stores B | spill loads B "
          "| subroutine calls |")
    print("|---|---|---|---|---|---|---|---|")
    for src in args.sources:
        for arch in args.arch.split(","):
            try:
                rows = report(src, arch.strip(), nvcc, cuobjdump)
            except RuntimeError as exc:
                print(exc, file=sys.stderr)
                return 1
            for r in rows:
                if r["spill_st"] or r["spill_ld"]:
                    spilled.append(f"{_demangle(r['kernel'])} on {r['arch']}")
                calls = "?" if r["calls"] is None else r["calls"]
                print(f"| {src.name} | {_demangle(r['kernel'])} | {r['arch']} | {r['regs']} "
                      f"| {r['stack']} | {r['spill_st']} | {r['spill_ld']} | {calls} |")
    if spilled and args.fail_on_spill:
        print("register spills in: " + ", ".join(spilled), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
