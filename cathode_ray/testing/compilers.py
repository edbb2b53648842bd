"""Whether TorchInductor can compile on the CPU here: it builds C++ kernels, so it needs a compiler.

Tests of compiled models (``compile_model``) skip without one; the product itself falls back to
the uncompiled model, logged.
"""

from __future__ import annotations

import shutil

#: C++ compilers TorchInductor can use on the CPU.
CXX_COMPILERS: tuple[str, ...] = ("g++", "c++", "clang++")


def cxx_compiler_available() -> bool:
    """True when a C++ compiler is on PATH."""
    return any(shutil.which(c) for c in CXX_COMPILERS)
