"""glibc malloc settings for inference processes: keep freed memory for the next sub-batch.

PyTorch's CPU tensors come from the C library's ``malloc``. glibc maps a large block (above an
adaptive threshold, from 128 KiB) straight from the kernel and unmaps it when freed, and returns
freed heap memory to the kernel once more than twice that threshold is free. An inference actor
allocates and frees tensors of a few MB for every sub-batch, so with the defaults most of them
arrive as fresh pages: the kernel zero-fills each 4 KiB page on first touch (a minor page fault).
:func:`retain_freed_memory` fixes both thresholds (``mallopt``), which also turns the adaptation
off, so freed blocks are reused. Users who tune malloc themselves (``glibc.malloc`` in
``GLIBC_TUNABLES``, ``MALLOC_MMAP_THRESHOLD_`` and the like) or preload another allocator
(jemalloc, tcmalloc) keep their settings.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform

from cathode_ray import seedcard

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1  # glibc <malloc.h>
_M_MMAP_THRESHOLD = -3


_THRESHOLD_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")


def _user_tunes_malloc() -> bool:
    env = os.environ
    return ("glibc.malloc" in env.get("GLIBC_TUNABLES", "") or "malloc" in env.get("LD_PRELOAD", "")
            or any(k in env for k in _THRESHOLD_VARIABLES))


def retain_freed_memory(*, mmap_threshold: int = seedcard.MALLOC_MMAP_THRESHOLD_BYTES,
                        trim_threshold: int = seedcard.MALLOC_TRIM_THRESHOLD_BYTES) -> bool:
    """Set glibc's mmap threshold and trim threshold (bytes) for this process.

    Returns True when applied; False where the C library is not glibc (nothing to do) or the user
    set malloc up already (left alone).
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc" or _user_tunes_malloc():
        return False
    libc = ctypes.CDLL(None)
    ok = libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold) == 1
    if not ok:
        log.warning("mallopt refused mmap threshold %d / trim threshold %d bytes", mmap_threshold, trim_threshold)
    return ok
