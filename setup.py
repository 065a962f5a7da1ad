"""Build of the native extension ``blip_kernels._C`` (metadata lives in pyproject.toml).

* CPU kernels (OpenMP) are always built.
* The CUDA kernels (csrc/cuda/*.cu) are compiled with nvcc and linked in when torch
  itself has CUDA and a CUDA toolkit of the same major version is found (search order
  in csrc/cuda/toolkit.py: CUDA_HOME, CUDA_PATH, the toolkit behind ``nvcc`` on PATH,
  /usr/local/cuda*); the extension then defines ``BLIP_WITH_CUDA``. Without a toolkit
  the build goes on CPU-only with one warning saying what is missing.
* ``BLIP_CUDA=1`` makes a missing toolkit (or a CPU-only torch) an error instead;
  ``BLIP_CUDA=0`` builds CPU-only even with a CUDA torch.
* ``BLIP_CUDA_ARCH`` (default ``8.0;9.0+PTX``, TORCH_CUDA_ARCH_LIST style) chooses
  the GPU targets; ``+PTX`` adds PTX for newer GPUs.
* ``BLIP_NO_EXT=1`` skips the native build entirely; the package still imports and
  runs on the reference / triton backends.
* Objects are kept in ``build/ext-<key>/`` (one per environment and torch build), so a
  re-install (``pip install -e ".[rl]"`` after ``pip install -e .``) finds them up to
  date and only links; delete ``build/`` to force a clean build.

torch must already be installed: ``pip install --no-build-isolation [-e] .``.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import importlib.util
import os
import sys
from types import ModuleType

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _rel(pattern: str) -> list[str]:
    # setuptools wants source paths relative to the project root.
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


@functools.cache
def _toolkit_module() -> ModuleType:
    # csrc/cuda/toolkit.py is shared with CMakeLists.txt; load it by path (not a package).
    spec = importlib.util.spec_from_file_location(
        "blip_cuda_toolkit", os.path.join(ROOT, "csrc", "cuda", "toolkit.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _cuda_toolkit(torch: ModuleType) -> object | None:
    """The toolkit to build the CUDA kernels with, or None for a CPU-only build."""
    mode = os.environ.get("BLIP_CUDA", "")
    if mode not in ("", "0", "1"):
        sys.exit(f"error: BLIP_CUDA={mode!r}: use 1 (CUDA kernels required), 0 (CPU-only) "
                 "or leave it unset (CUDA kernels when torch and a toolkit have CUDA)")
    if mode == "0":
        return None
    if not torch.version.cuda:
        if mode == "1":
            sys.exit(f"error: BLIP_CUDA=1 but torch {torch.__version__} is a CPU-only build; "
                     "install a CUDA build of torch (e.g. pip install torch==2.14.1) first")
        return None  # CPU torch: the CPU-only build, as intended
    toolkit = _toolkit_module()
    try:
        found = toolkit.find_toolkit(torch.version.cuda)
    except toolkit.ToolkitError as exc:
        if mode == "1":
            sys.exit(f"error: BLIP_CUDA=1 asks for the CUDA kernels, but: {exc}")
        print(f"\nWARNING: blip: building blip_kernels._C WITHOUT its CUDA kernels: {exc}; "
              "or set BLIP_CUDA=0 to build CPU-only on purpose\n", file=sys.stderr)
        return None
    return found


def _persistent_build_ext(base: type, torch: ModuleType, cuda: bool) -> type:
    """``base`` (torch's BuildExtension) compiling into a build directory that survives.

    pip's editable install points ``build_temp`` at a fresh temporary directory, so ninja
    found no objects and every install (each extra added later) compiled everything again.
    The key separates environments (interpreter prefix) and torch builds, whose objects
    must not be mixed; within one, ninja rebuilds exactly what changed (sources, headers
    through its depfiles, compiler flags).
    """
    ident = f"{sys.prefix}|{sys.version}|{torch.__version__}|{torch.version.cuda}|{cuda}"
    key = hashlib.sha256(ident.encode()).hexdigest()[:12]
    build_temp = os.path.join(ROOT, "build", f"ext-{key}")

    class PersistentBuildExt(base):
        def run(self) -> None:
            self.build_temp = build_temp
            super().run()

    return PersistentBuildExt


def _ext_modules() -> tuple[list, dict]:
    if os.environ.get("BLIP_NO_EXT", "0") not in ("", "0"):
        return [], {}
    import torch

    found = _cuda_toolkit(torch)
    if found is not None:
        # torch.utils.cpp_extension reads CUDA_HOME once, at import: point it at the
        # toolkit found (torch's own guess is the wrapper's directory when the nvcc on
        # PATH is a wrapper script), and also set it on the module in case it was imported.
        os.environ["CUDA_HOME"] = str(found.root)
    from torch.utils import cpp_extension

    # No -march=native (wheels and CI machines differ); no -ffast-math and no FMA
    # contraction: the kernels must round exactly like the fp32 reference.
    # -fno-trapping-math only lets the selects of the elementwise loops vectorize.
    cxx = [
        "-O3", "-g0", "-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math",
    ]
    sources = _rel("csrc/*.cpp") + _rel("csrc/cpu/*.cpp")
    kwargs: dict = {
        "extra_compile_args": {"cxx": cxx},
        "extra_link_args": ["-fopenmp"],
        "include_dirs": [os.path.join(ROOT, "csrc")],
    }
    if found is not None:
        cpp_extension.CUDA_HOME = str(found.root)
        try:
            # Explicit -gencode flags also stop torch adding its TORCH_CUDA_ARCH_LIST ones.
            toolkit = _toolkit_module()
            spec = os.environ.get("BLIP_CUDA_ARCH") or toolkit.DEFAULT_ARCH
            gencode = toolkit.gencode_flags(spec)
        except ValueError as exc:
            sys.exit(f"error: {exc}")
        kwargs["extra_compile_args"]["cxx"].append("-DBLIP_WITH_CUDA")
        kwargs["extra_compile_args"]["nvcc"] = [
            "-O3", "-std=c++17", "--fmad=false", "-DBLIP_WITH_CUDA", *gencode,
        ]
        print(f"blip: CUDA kernels with {found.nvcc} (CUDA {found.version[0]}."
              f"{found.version[1]}), {' '.join(gencode)}", file=sys.stderr)
        ext = cpp_extension.CUDAExtension(
            "blip_kernels._C", sources + _rel("csrc/cuda/*.cu"), **kwargs
        )
    else:
        ext = cpp_extension.CppExtension("blip_kernels._C", sources, **kwargs)
    build_ext = _persistent_build_ext(
        cpp_extension.BuildExtension.with_options(use_ninja=True), torch, found is not None)
    return [ext], {"build_ext": build_ext}


ext_modules, cmdclass = _ext_modules()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
