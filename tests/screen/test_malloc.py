"""glibc malloc keeps freed memory for the next sub-batch once retain_freed_memory() has run."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

# A sub-batch's tensors: ten of 4 MiB, written, then freed. Prints whether retain_freed_memory
# applied and how many MiB of resident memory the process gave back when they were freed. (Page-fault
# counts would measure the cost more directly, but transparent huge pages make them vary run to run.)
_SUB_BATCH = """
import os, sys, torch
from cathode_ray.screen.malloc import retain_freed_memory
applied = retain_freed_memory() if sys.argv[1] == "retain" else None
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
tensors = [torch.empty(2**20).fill_(1.0) for _ in range(10)]
held = rss()
del tensors
print(applied, (held - rss()) // 2**20)
"""


def _sub_batch(mode: str, env: dict[str, str] | None = None) -> tuple[str, int]:
    """(whether retain_freed_memory applied, MiB given back to the system) in a fresh process."""
    clean = {k: v for k, v in os.environ.items()  # glibc's defaults, whatever the caller's malloc setup
             if k not in ("GLIBC_TUNABLES", "LD_PRELOAD") and not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", _SUB_BATCH, mode], capture_output=True, text=True, check=True,
                         env={**clean, **(env or {})}).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_freed_memory_stays_for_the_next_sub_batch() -> None:
    _, default_returned = _sub_batch("default")
    applied, retained_returned = _sub_batch("retain")
    assert applied == "True"
    assert default_returned >= 30  # glibc's defaults unmap the 40 MiB: the next sub-batch faults it in again
    assert retained_returned <= 4  # kept in the heap for reuse


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_a_users_own_malloc_settings_are_left_alone() -> None:
    applied, _ = _sub_batch("retain", {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1000000"})
    assert applied == "False"
    applied, _ = _sub_batch("retain", {"MALLOC_TRIM_THRESHOLD_": "1000000"})
    assert applied == "False"
    applied, _ = _sub_batch("retain", {"MALLOC_ARENA_MAX": "2"})
    assert applied == "True"  # arenas, not the thresholds this sets
