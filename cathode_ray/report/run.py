"""``cathode-ray report``: load a model and a labelled dataset, predict, write the governance report.

By default the metrics table covers the dataset's val, test and loco splits and the checks judge
test; ``--split val|test|loco`` restricts both to one (val is always kept for the checks that need
it; checks on val are in-sample, since val calibrated the model); ``--split all`` judges every row
of the dataset as one evaluation set "all", for a dataset ingested from another snapshot. It is
refused on the dataset the model was trained on, whose train and val rows would be scored in-sample.

Caveat: by default val both stops each member's training early (:mod:`cathode_ray.train.loop`) and
fits the conformal offsets and triage thresholds, so coverage on val is optimistic (``cathode-ray
train --early-stopping holdout`` stops on held-out training rows instead); the checks that matter
are on test and loco, which neither step saw.

``compare`` names other model directories trained on the same dataset (e.g. a head-only and a
last-block ensemble): each is evaluated the same way and the report gains an "ensemble modes"
table of their accuracy, calibration, triage and measured members' cost, so users can choose.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from cathode_ray.calibrate.calibrator import Calibrator
from cathode_ray.data.dataset import load_data_version
from cathode_ray.model.ensemble import Ensemble
from cathode_ray.train.ensemble import DEFAULT_CACHE, PreparedData, predict_prepared, prepare

from .governance import SplitData, mode_summary, report_from_predictions, write_report

SplitChoice = Literal["splits", "val", "test", "loco", "all"]


@dataclass(frozen=True, kw_only=True)
class ReportConfig:
    """Attributes: model (dir or s3://), data (dataset dir), references (``snapshot:PATH`` or
    ``mp``), split, out (report directory), cache_dir for trunk features, compare (other model
    directories on the same dataset for the ensemble-mode table)."""

    model: str
    data: str
    references: str
    out: str
    split: SplitChoice = "splits"
    cache_dir: str | None = DEFAULT_CACHE
    device: str = "cpu"
    compare: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.split not in ("splits", "val", "test", "loco", "all"):
            raise ValueError(f"split must be splits, val, test, loco or all, got {self.split!r}")


def _split_data(ens: Ensemble, prepared: PreparedData, mask: np.ndarray) -> SplitData:
    idx = np.flatnonzero(mask)
    sub = PreparedData(data=prepared.part_rows(idx), split=prepared.split[idx], clusters=prepared.clusters[idx],
                       compositions=[prepared.compositions[i] for i in idx], ids=[prepared.ids[i] for i in idx])
    return SplitData(y=sub.data.y.numpy().astype(float), pred=predict_prepared(ens, sub),
                     clusters=sub.clusters, compositions=sub.compositions)


def _evaluate(model: str, config: ReportConfig) -> tuple[Ensemble, dict[str, Any], float]:
    """Load ``model``, predict the chosen splits, build its report; also time the members' part."""
    ens = Ensemble.load(model, device=config.device)
    own = load_data_version(config.data) == ens.manifest.get("data_version")
    if config.split == "all" and own:
        raise ValueError(f"--split all: {config.data} is the dataset {model} was trained on, so its train "
                         "and val rows would be scored in-sample; use the default splits, --split test or "
                         "--split loco, or a dataset ingested from another snapshot")
    calibrator = Calibrator.from_files(ens.files, where=model)
    wanted = {"splits": ("val", "test", "loco"), "all": None}.get(config.split, ("val", config.split))
    # another snapshot's ingest fitted its own SOAP clusters: label its rows with the model's
    # clusterer, as the screen does, or the per-cluster offsets land on unrelated clusters
    clusterer = None if own else ens.soap_clusterer()
    prepared = prepare(config.data, ens.backbone, config.references, cache_dir=config.cache_dir,
                       device=config.device, splits=wanted, clusterer=clusterer)
    if config.split == "all":
        names = {"val": prepared.split == "val", "all": np.ones(len(prepared.ids), dtype=bool)}
        if not names["val"].any():
            names.pop("val")
    else:
        # prepared holds only the wanted splits
        names = {n: prepared.split == n for n in ("val", "test", "loco") if (prepared.split == n).any()}
    t0 = time.perf_counter()
    splits = {n: _split_data(ens, prepared, m) for n, m in names.items()}
    ms = 1e3 * (time.perf_counter() - t0) / max(sum(int(m.sum()) for m in names.values()), 1)
    evaluation = {"splits": "test"}.get(config.split, config.split)
    report = report_from_predictions(splits, calibrator, evaluation=evaluation, val_calibrated=own)
    report["clusters_from"] = "dataset" if clusterer is None else "model"
    return ens, report, ms


def run(config: ReportConfig) -> dict[str, Any]:
    """Write governance.json, report.md and plots into ``config.out``; return the report dict."""
    ens, report, ms = _evaluate(config.model, config)
    report["model"] = {"uri": config.model, "model_id": ens.model_id,
                       "backbone": ens.manifest["backbone"], "members": ens.manifest["members"],
                       "data_version": ens.manifest.get("data_version")}
    if config.compare:
        modes = []
        for uri, (e, r, t) in [(config.model, (ens, report, ms)),
                               *((u, _evaluate(u, config)) for u in config.compare)]:
            if e.backbone.identity() != ens.backbone.identity():
                raise ValueError(f"{uri}: backbone {e.backbone.name} differs from {ens.backbone.name}; "
                                 "compare models on the same backbone")
            modes.append(mode_summary(r, mode="head-only" if e.shared_last_block else "last-block",
                                      n_members=len(e.members), members_ms_per_structure=t,
                                      model_id=e.model_id))
        report["ensemble_modes"] = modes
    write_report(report, Path(config.out))
    return report
