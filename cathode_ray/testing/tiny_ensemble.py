"""A small but real trained + calibrated ensemble, for tests and benchmarks.

``n`` small real MP materials -> ``cathode_ray.data.dataset.run`` (ingest, SOAP clusters, splits)
-> ``cathode_ray.train.ensemble.run`` (``members`` members, 2 epochs, local runner, calibration).
About a minute on 2 CPUs with CHGNet; with a tiny MACE backbone (``mace:PATH`` from
:func:`cathode_ray.testing.tiny_mace.build_tiny_mace`) screening with it is fast enough to
stream 100,000 structures through the pipeline on a laptop.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any


def small_docs(summary: str | Path, n: int = 60, max_sites: int = 16) -> list[dict[str, Any]]:
    """The first ``n`` documents of an MP summary JSON-lines file with at most ``max_sites``
    sites (deterministic)."""
    docs: list[dict[str, Any]] = []
    with gzip.open(summary, "rt") as fh:
        for line in fh:
            doc = json.loads(line)
            if int(doc.get("nsites", 999)) <= max_sites:
                docs.append(doc)
                if len(docs) >= n:
                    break
    return docs


def build_tiny_ensemble(workdir: Path, *, summary: str | Path, references: str, n: int = 60,
                        members: int = 2, backbone: str = "chgnet", device: str = "cpu") -> Path:
    """Ingest ``n`` small materials of ``summary`` and train a calibrated ensemble.

    Args:
        workdir: scratch directory (snapshot subset, dataset and ``model/`` are written here).
        summary: MP summary JSON lines (``../shared/data/mp_litmo_summary.jsonl.gz``).
        references: reference entries for hulls, ``snapshot:PATH``.
        backbone: backbone spec (``chgnet`` or ``mace:PATH``).
        device: where the trunk and the members run (``cpu``, ``cuda``).

    Returns:
        The model directory.
    """
    from cathode_ray.data.dataset import IngestConfig
    from cathode_ray.data.dataset import run as ingest
    from cathode_ray.data.splits import SoapConfig
    from cathode_ray.train.ensemble import EnsembleTrainConfig
    from cathode_ray.train.ensemble import run as train

    workdir.mkdir(parents=True, exist_ok=True)
    snap = workdir / "snapshot.jsonl.gz"
    with gzip.open(snap, "wt") as fh:
        for doc in small_docs(summary, n):
            fh.write(json.dumps(doc) + "\n")
    data = workdir / "dataset"
    ingest(IngestConfig(source=f"snapshot:{snap}", out=str(data), verbose=False,
                        soap=SoapConfig(n_clusters=3, n_max=2, l_max=2)))
    model = workdir / "model"
    train(EnsembleTrainConfig(data=str(data), out=str(model), references=references,
                              backbone=backbone, members=members, max_epochs=2, runner="local",
                              cache_dir=None, device=device))
    return model


def build_medium_shape_ensemble(workdir: Path, *, summary: str | Path, references: str,
                                device: str = "cpu") -> Path:
    """A calibrated 5-member ensemble on a random-weight MACE-MP-0-medium-shaped backbone (random
    weights cost what trained ones do): for timings of the real model's size. Returns the model
    directory."""
    from cathode_ray.testing.tiny_mace import build_medium_shape_mace

    path = build_medium_shape_mace(workdir / "medium_shape.model")
    return build_tiny_ensemble(workdir / "ensemble", summary=summary, references=references,
                               backbone=f"mace:{path}", members=5, device=device)
