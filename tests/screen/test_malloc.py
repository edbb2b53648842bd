"""glibc malloc keeps freed memory for the next sub-batch once retain_freed_memory() has run."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

# Sub-batches' pattern: 20 rounds of ten tensors of 1-8 MiB (random sizes) alive together, then
# freed. Prints the minor page faults of rounds 2-20 (each page faults when first written) and the
# pages those rounds wrote.
_CHURN = """
import resource, sys, torch
from cathode_ray.screen.malloc import retain_freed_memory
applied = retain_freed_memory() if sys.argv[1] == "retain" else None
sizes = (torch.randint(1, 9, (20, 10), generator=torch.Generator().manual_seed(0)) * 2**18).tolist()
def sub_batch(numels):
    return [torch.empty(n).fill_(1.0) for n in numels]
sub_batch(sizes[0])
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for numels in sizes[1:]:
    sub_batch(numels)
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, sum(map(sum, sizes[1:])) // 1024)
"""


def _churn(mode: str, env: dict[str, str] | None = None) -> tuple[str, int, int]:
    """(whether retain_freed_memory applied, page faults, pages written) in a fresh process."""
    out = subprocess.run([sys.executable, "-c", _CHURN, mode], capture_output=True, text=True, check=True,
                         env={**os.environ, **(env or {})}).stdout.split()
    return out[0], int(out[1]), int(out[2])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_freed_blocks_are_reused_instead_of_faulted_in_again() -> None:
    _, default_faults, pages = _churn("default")
    applied, retained_faults, _ = _churn("retain")
    assert applied == "True"
    assert default_faults > pages // 10  # glibc's defaults give blocks back, then fault them in again
    assert retained_faults < default_faults // 3  # measured: 30,653 vs 4,608 of 210,176 pages


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_a_users_own_malloc_settings_are_left_alone() -> None:
    applied, _, _ = _churn("retain", {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1000000"})
    assert applied == "False"
    applied, _, _ = _churn("retain", {"MALLOC_TRIM_THRESHOLD_": "1000000"})
    assert applied == "False"
    applied, _, _ = _churn("retain", {"MALLOC_ARENA_MAX": "2"})
    assert applied == "True"  # arenas, not the thresholds this sets
