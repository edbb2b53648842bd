"""Build a small but real trained + calibrated CHGNet ensemble for the screening tests.

~60 small real MP materials (from ../shared/data) -> ``cathode_ray.data.dataset.run`` ->
``cathode_ray.train.ensemble.run`` (2 members, 2 epochs, local runner). About a minute on 2 CPUs.
"""

from __future__ import annotations

import gzip
import json
import time
from pathlib import Path

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
    docs: list[dict] = []
    with gzip.open(SUMMARY, "rt") as fh:
        for line in fh:
            doc = json.loads(line)
            if int(doc.get("nsites", 999)) <= max_sites:
                docs.append(doc)
                if len(docs) >= n:
                    break
    return docs


def build_tiny_model(workdir: Path, *, n: int = 60, members: int = 2) -> Path:
    """Ingest ``n`` small materials and train a calibrated ensemble; returns the model dir."""
    from cathode_ray.data.dataset import IngestConfig
    from cathode_ray.data.dataset import run as ingest
    from cathode_ray.data.splits import SoapConfig
    from cathode_ray.train.ensemble import EnsembleTrainConfig
    from cathode_ray.train.ensemble import run as train

    workdir.mkdir(parents=True, exist_ok=True)
    snap = workdir / "snapshot.jsonl.gz"
    with gzip.open(snap, "wt") as fh:
        for doc in small_docs(n):
            fh.write(json.dumps(doc) + "\n")
    data = workdir / "dataset"
    ingest(IngestConfig(source=f"snapshot:{snap}", out=str(data), verbose=False,
                        soap=SoapConfig(n_clusters=3, n_max=2, l_max=2)))
    model = workdir / "model"
    train(EnsembleTrainConfig(data=str(data), out=str(model), references=f"snapshot:{REFERENCES}",
                              members=members, max_epochs=2, runner="local", cache_dir=None))
    return model


if __name__ == "__main__":  # manual timing: python tests/screen/tiny_model.py /tmp/dir
    import sys

    t0 = time.perf_counter()
    print(build_tiny_model(Path(sys.argv[1])), f"{time.perf_counter() - t0:.1f}s")
