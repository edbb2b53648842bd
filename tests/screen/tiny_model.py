"""The small trained + calibrated CHGNet ensemble of the screening tests, on ../shared/data.

See :mod:`cathode_ray.testing.tiny_ensemble` (2 members, 2 epochs; about a minute on 2 CPUs).
"""

from __future__ import annotations

import time
from pathlib import Path

from cathode_ray.testing import tiny_ensemble

#: ../shared/data relative to the repository root.
SHARED_DATA: Path = Path(__file__).resolve().parents[2].parent / "shared" / "data"
SUMMARY = SHARED_DATA / "mp_litmo_summary.jsonl.gz"
REFERENCES = SHARED_DATA / "mp_reference_entries.jsonl.gz"


def shared_data_missing() -> str | None:
    """A skip message when the shared MP snapshot is absent, else None."""
    missing = [p.name for p in (SUMMARY, REFERENCES) if not p.is_file()]
    if missing:
        return (f"real data {missing} not found under {SHARED_DATA}; place the MP snapshot "
                "files in ../shared/data (next to the repository) to run the screening tests")
    return None


def small_docs(n: int = 60, max_sites: int = 16) -> list[dict]:
    """The first ``n`` snapshot documents with at most ``max_sites`` sites (deterministic)."""
    return tiny_ensemble.small_docs(SUMMARY, n, max_sites)


def build_tiny_model(workdir: Path, *, n: int = 60, members: int = 2) -> Path:
    """Ingest ``n`` small materials and train a calibrated CHGNet ensemble; returns the model dir."""
    return tiny_ensemble.build_tiny_ensemble(workdir, summary=SUMMARY, references=f"snapshot:{REFERENCES}",
                                             n=n, members=members)


if __name__ == "__main__":  # manual timing: python tests/screen/tiny_model.py /tmp/dir
    import sys

    t0 = time.perf_counter()
    print(build_tiny_model(Path(sys.argv[1])), f"{time.perf_counter() - t0:.1f}s")
