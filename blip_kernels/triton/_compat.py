"""What differs between the Triton versions this backend runs on, in one place.

Tested: triton 3.6 (what torch 2.11 pulls in, and the GPU image's) and 3.7 (torch 2.13's,
CI's main stack). The kernels themselves are one code path for both; only what is listed
here depends on the version.

* The interpreter (``TRITON_INTERPRET=1``) before 3.7 passes a scalar kernel argument as a
  one-element array and converts it to an index with ``int(array)``, which numpy >= 2.4
  refuses ("only 0-dimensional arrays can be converted to Python scalars"): every loop
  ``for i in range(0, N, BLOCK)`` with a run-time ``N`` raised TypeError there. Triton 3.7
  squeezes the array first; :func:`fix_interpreter_scalar_index` gives 3.6 the same rule.
  Compiled kernels are not affected (``range`` becomes an ``scf.for`` loop).
* Register allocation differs (3.6 spills where 3.7 does not): the configs in fisher.py
  are chosen to be spill-free under both, as ``aot_check`` proves per version.
"""

from __future__ import annotations

import operator
import re

import triton

#: Triton versions (major, minor) the backend and the ahead-of-time check are tested with.
TESTED = ((3, 6), (3, 7))


def parse_version(text: str) -> tuple[int, int]:
    """(major, minor) of a version string such as ``3.6.0``, ``3.7.1+git1234`` or ``3.8``."""
    m = re.match(r"(\d+)\.(\d+)", text)
    if m is None:
        raise ValueError(f"not a triton version: {text!r}")
    return int(m.group(1)), int(m.group(2))


VERSION: tuple[int, int] = parse_version(triton.__version__)

#: Whether this interpreter needs the scalar-index fix (decided by version; 3.7 has it).
NEEDS_INDEX_FIX: bool = VERSION < (3, 7)


def _squeezed_index(self) -> int:  # noqa: ANN001 - an interpreter tl.tensor
    return operator.index(self.handle.data.reshape(-1)[0].item())


def fix_interpreter_scalar_index() -> bool:
    """Make the interpreter's ``tensor.__index__`` accept a one-element array (what triton
    3.7 does) on a triton that needs it. Idempotent; returns whether the fix is in place.

    The interpreter sets ``__index__`` anew at each launch (in ``_patch_lang_tensor``), so
    that function is wrapped: it sets its own, then ours replaces it for the launch."""
    if not NEEDS_INDEX_FIX:
        return False
    from triton.runtime import interpreter

    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None:  # an interpreter laid out otherwise: nothing known to fix
        return False
    if getattr(original, "_blip_index_fix", False):
        return True

    def patch_lang_tensor(tensor, scope):  # noqa: ANN001, ANN202 - triton's own signature
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", _squeezed_index)

    patch_lang_tensor._blip_index_fix = True  # type: ignore[attr-defined]
    interpreter._patch_lang_tensor = patch_lang_tensor
    return True
