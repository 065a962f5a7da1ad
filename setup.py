"""Build of the native extension ``blip_kernels._C`` (metadata lives in pyproject.toml).

* CPU kernels (OpenMP) are always built.
* The CUDA kernels (csrc/cuda/*.cu) are compiled with nvcc and linked in when torch
  itself has CUDA and a toolkit is found (CUDA_HOME); the extension then defines
  ``BLIP_WITH_CUDA``.
* ``BLIP_NO_EXT=1`` skips the native build entirely; the package still imports and
  runs on the reference / triton backends.

torch must already be installed: ``pip install --no-build-isolation [-e] .``.
"""

from __future__ import annotations

import glob
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _rel(pattern: str) -> list[str]:
    # setuptools wants source paths relative to the project root.
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _ext_modules() -> tuple[list, dict]:
    if os.environ.get("BLIP_NO_EXT", "0") not in ("", "0"):
        return [], {}
    import torch
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
    with_cuda = bool(torch.version.cuda) and cpp_extension.CUDA_HOME is not None
    if with_cuda:
        kwargs["extra_compile_args"]["cxx"].append("-DBLIP_WITH_CUDA")
        kwargs["extra_compile_args"]["nvcc"] = [
            "-O3",
            "-std=c++17",
            "--fmad=false",
            "-DBLIP_WITH_CUDA",
            "-gencode=arch=compute_80,code=sm_80",
            "-gencode=arch=compute_90,code=sm_90",
            "-gencode=arch=compute_90,code=compute_90",
        ]
        ext = cpp_extension.CUDAExtension(
            "blip_kernels._C", sources + _rel("csrc/cuda/*.cu"), **kwargs
        )
    else:
        ext = cpp_extension.CppExtension("blip_kernels._C", sources, **kwargs)
    build_ext = cpp_extension.BuildExtension.with_options(use_ninja=True)
    return [ext], {"build_ext": build_ext}


ext_modules, cmdclass = _ext_modules()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
