"""Finding the CUDA toolkit and reading BLIP_CUDA_ARCH: the one place for both.

Used by setup.py (imported by path) and by CMakeLists.txt (run as a script):

    python3 csrc/cuda/toolkit.py root            # prints the toolkit directory
    python3 csrc/cuda/toolkit.py cmake-archs     # BLIP_CUDA_ARCH as CMAKE_CUDA_ARCHITECTURES
    python3 csrc/cuda/toolkit.py gencode         # ... as nvcc -gencode flags

``root`` exits 1 with the reason on stderr when no usable toolkit is found.

Search order: ``CUDA_HOME``, then ``CUDA_PATH`` (when set, the user's choice is final:
a bad one is an error, never silently replaced), then the toolkit behind the ``nvcc``
on PATH (symlinks resolved; when it is a wrapper script, nvcc itself is asked where
its toolkit is, ``TOP=`` of ``--dryrun``, or the script's ``exec`` line is read),
then ``/usr/local/cuda`` and ``/usr/local/cuda-*`` (newest first), then a toolkit
installed from NVIDIA's pip wheels (``site-packages/nvidia/cu<major>``). A toolkit is
usable when it has ``bin/nvcc`` and ``include/cuda_runtime_api.h`` and, when torch
has CUDA, the same major version as ``torch.version.cuda``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

DEFAULT_ARCH = "8.0;9.0+PTX"
HEADER = Path("include") / "cuda_runtime_api.h"
_ARCH = re.compile(r"^(\d+)\.(\d)([af]?)(\+PTX)?$")


class ToolkitError(RuntimeError):
    """No usable CUDA toolkit; the message names what was missing and how to fix it."""


@dataclass(frozen=True)
class Toolkit:
    root: Path
    version: tuple[int, int]

    @property
    def nvcc(self) -> Path:
        return self.root / "bin" / "nvcc"


def header_version(root: Path) -> tuple[int, int] | None:
    """(major, minor) from CUDART_VERSION in include/cuda_runtime_api.h."""
    try:
        text = (root / HEADER).read_text(errors="replace")
    except OSError:
        return None
    m = re.search(r"#define\s+CUDART_VERSION\s+(\d+)", text)
    if not m:
        return None
    v = int(m.group(1))
    return v // 1000, (v % 1000) // 10


def _problem(root: Path, torch_cuda: str | None) -> str | None:
    """Why ``root`` is not a usable toolkit (None when it is)."""
    if not (root / "bin" / "nvcc").is_file():
        return f"{root} has no bin/nvcc"
    if not (root / HEADER).is_file():
        return f"{root} has no {HEADER}"
    version = header_version(root)
    if version is None:
        return f"{root / HEADER} has no CUDART_VERSION"
    if torch_cuda:
        want = int(torch_cuda.split(".")[0])
        if version[0] != want:
            return (f"{root} is CUDA {version[0]}.{version[1]} but torch was built with "
                    f"CUDA {torch_cuda} (the major versions must match)")
    return None


def _behind_nvcc(nvcc: str) -> Iterator[tuple[str, Path]]:
    """Toolkit directories that the nvcc at this path belongs to, most direct first."""
    real = Path(os.path.realpath(nvcc))
    yield f"nvcc on PATH ({nvcc} -> {real})", real.parent.parent
    # A wrapper script: ask nvcc itself (its driver prints TOP=<toolkit>/bin/..).
    try:
        proc = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                              capture_output=True, text=True, timeout=60, check=False)
        m = re.search(r"^#\$ TOP=(.+)$", proc.stdout + proc.stderr, re.MULTILINE)
        if m:
            yield f"{nvcc} --dryrun (TOP=)", Path(os.path.realpath(m.group(1).strip()))
    except (OSError, subprocess.SubprocessError):
        pass
    # ... or read the exec line of a small shell wrapper.
    try:
        if real.stat().st_size < 64 * 1024:
            text = real.read_text(errors="replace")
            for m in re.finditer(r"exec\s+[\"']?(/[^\s\"']*/bin/nvcc)\b", text):
                yield f"exec line of {real}", Path(os.path.realpath(m.group(1))).parent.parent
    except OSError:
        pass


def _conventional() -> Iterator[tuple[str, Path]]:
    yield "/usr/local/cuda", Path("/usr/local/cuda")

    def key(p: Path) -> tuple[int, ...]:
        return tuple(int(x) for x in re.findall(r"\d+", p.name))

    for p in sorted(Path("/usr/local").glob("cuda-*"), key=key, reverse=True):
        yield str(p), p
    # NVIDIA's pip wheels (nvidia-cuda-nvcc & co., e.g. via the `cuda-toolkit` package)
    # install a toolkit as site-packages/nvidia/cu<major>/{bin,include,lib}.
    for entry in sys.path:
        for p in sorted(Path(entry or ".").glob("nvidia/cu[0-9]*"), key=key, reverse=True):
            yield f"pip wheel toolkit {p}", p


def find_toolkit(torch_cuda: str | None = None,
                 env: Mapping[str, str] | None = None) -> Toolkit:
    """The CUDA toolkit to build with; raises ToolkitError naming what is missing."""
    env = os.environ if env is None else env
    need = f" {torch_cuda.split('.')[0]}.x" if torch_cuda else ""
    fix = (f"install the CUDA toolkit{need} and set CUDA_HOME to its directory (the one "
           f"holding bin/nvcc and {HEADER})")
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if env.get(var):
            root = Path(env[var]).expanduser()
            why = _problem(root, torch_cuda)
            if why:
                raise ToolkitError(f"{var}={env[var]}: {why}; {fix}")
            return Toolkit(root.resolve(), header_version(root))  # type: ignore[arg-type]
    tried: list[str] = ["CUDA_HOME and CUDA_PATH unset"]
    seen: set[Path] = set()
    nvcc = shutil.which("nvcc", path=env.get("PATH"))
    candidates: list[Iterator[tuple[str, Path]]] = []
    if nvcc:
        candidates.append(_behind_nvcc(nvcc))
    else:
        tried.append("no nvcc on PATH")
    candidates.append(_conventional())
    for source in candidates:
        for label, root in source:
            resolved = Path(os.path.realpath(root))
            if resolved in seen:
                continue
            seen.add(resolved)
            if not root.exists():
                tried.append(f"{label}: missing")
                continue
            why = _problem(resolved, torch_cuda)
            if why is None:
                return Toolkit(resolved, header_version(resolved))  # type: ignore[arg-type]
            tried.append(f"{label}: {why}")
    raise ToolkitError(f"no usable CUDA toolkit ({'; '.join(tried)}); {fix}")


def parse_arch_list(spec: str) -> list[tuple[str, bool]]:
    """'8.0;9.0+PTX' -> [('80', False), ('90', True)]. Separators: ';', ',' or spaces.

    Raises ValueError naming BLIP_CUDA_ARCH on anything else."""
    items = [s for s in re.split(r"[;,\s]+", spec.strip()) if s]
    if not items:
        raise ValueError(f"BLIP_CUDA_ARCH={spec!r} names no architecture; use e.g. {DEFAULT_ARCH}")
    out = []
    for item in items:
        m = _ARCH.match(item)
        if not m:
            raise ValueError(
                f"BLIP_CUDA_ARCH={spec!r}: {item!r} is not MAJOR.MINOR[a|f][+PTX] "
                f"(TORCH_CUDA_ARCH_LIST style, e.g. {DEFAULT_ARCH})")
        out.append((m.group(1) + m.group(2) + m.group(3), bool(m.group(4))))
    return out


def gencode_flags(spec: str) -> list[str]:
    """nvcc flags: machine code for each arch, plus PTX for those marked +PTX."""
    flags = []
    for sm, ptx in parse_arch_list(spec):
        flags.append(f"-gencode=arch=compute_{sm},code=sm_{sm}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{sm},code=compute_{sm}")
    return flags


def cmake_architectures(spec: str) -> str:
    """CMAKE_CUDA_ARCHITECTURES: '80-real;90' for '8.0;9.0+PTX' (plain '90' = SASS + PTX)."""
    return ";".join(sm if ptx else f"{sm}-real" for sm, ptx in parse_arch_list(spec))


def _torch_cuda() -> str | None:
    try:
        import torch  # noqa: PLC0415 - optional here: the CMake build may run without it
    except ImportError:
        return None
    return torch.version.cuda


def main(argv: list[str]) -> int:
    what = argv[0] if argv else "root"
    spec = os.environ.get("BLIP_CUDA_ARCH") or DEFAULT_ARCH
    try:
        if what == "root":
            print(find_toolkit(_torch_cuda()).root)
        elif what == "cmake-archs":
            print(cmake_architectures(spec))
        elif what == "gencode":
            print(" ".join(gencode_flags(spec)))
        else:
            print(f"usage: {Path(__file__).name} root|cmake-archs|gencode", file=sys.stderr)
            return 2
    except (ToolkitError, ValueError) as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
