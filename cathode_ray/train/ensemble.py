"""Train an ensemble end to end: dataset -> shared trunk features -> members -> calibrated
model directory. ``run(config)`` is what ``cathode-ray train`` and ``jobs/train_ensemble.py`` call.

Members run concurrently on Ray Train (:mod:`.ray_ensemble`) or one after another in-process
(``runner="local"``); both see the same trunk features, computed once here.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Collection
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pymatgen.core import Composition, Structure

from cathode_ray import seedcard
from cathode_ray.calibrate.calibrator import Calibrator, CalibratorConfig
from cathode_ray.data.dataset import load_dataset
from cathode_ray.data.references import ReferenceHull
from cathode_ray.data.splits import SoapClusterer, holdout_rows
from cathode_ray.model.artifact import ModelDir, git_commit
from cathode_ray.model.backbones import Backbone, load_backbone
from cathode_ray.model.ensemble import Ensemble
from cathode_ray.model.head import HeadConfig, HeadMode
from cathode_ray.model.member import Normalizer, ThermoInputs
from cathode_ray.model.prediction import EnsemblePrediction

from .features import cached_trunk_features, hull_inputs, member_data, subset
from .loop import FitResult, MemberData, TrainConfig

log = logging.getLogger(__name__)

DEFAULT_CACHE = str(Path("~/.cache/cathode_ray/trunk").expanduser())


@dataclass(frozen=True, kw_only=True)
class EnsembleTrainConfig:
    """Everything ``cathode-ray train`` needs (seed-card defaults).

    Attributes:
        data: dataset directory written by ``cathode-ray ingest``.
        out: model directory to write (local path or s3://).
        references: reference entries for hulls: ``snapshot:PATH`` or ``mp``.
        backbone: ``chgnet``, ``mace-mp-0-medium`` (or another MACE name) or ``mace:PATH``.
        members / seeds: ensemble size and one seed per member.
        head_mode: ``delta`` (zero-shot E_hull + learned correction) or ``embedding``.
        train_last_block: False = head-only members on one shared frozen embedding.
        runner: ``ray`` (concurrent Ray Train runs) or ``local`` (sequential, no Ray).
        early_stopping: the rows whose MAE stops each member: ``val`` (the seed card's), which
            also calibrates, so calibration sees a split the members were selected on; or
            ``holdout``, ``holdout_fraction`` of the training rows by whole formula groups, left
            out of fitting, so that val only calibrates.
    """

    data: str
    out: str
    references: str
    backbone: str = "chgnet"
    members: int = len(seedcard.SEEDS)
    seeds: tuple[int, ...] = seedcard.SEEDS
    head_mode: HeadMode = "delta"
    train_last_block: bool = True
    max_epochs: int = seedcard.MAX_EPOCHS
    patience: int = seedcard.PATIENCE
    runner: Literal["ray", "local"] = "ray"
    early_stopping: Literal["val", "holdout"] = "val"
    holdout_fraction: float = seedcard.EARLY_STOP_HOLDOUT
    address: str | None = None
    gpus_per_member: float = 0.0
    cpus_per_member: float = 1.0
    max_failures: int = 2
    device: str = "cpu"
    cache_dir: str | None = DEFAULT_CACHE
    calibration: CalibratorConfig = field(default_factory=CalibratorConfig)

    def __post_init__(self) -> None:
        if self.members < 1:
            raise ValueError("members must be >= 1")
        if len(self.seeds) < self.members:
            raise ValueError(f"need {self.members} seeds, got {len(self.seeds)}")
        if self.runner not in ("ray", "local"):
            raise ValueError("runner must be 'ray' or 'local'")
        if self.early_stopping not in ("val", "holdout"):
            raise ValueError(f"early_stopping must be 'val' or 'holdout', got {self.early_stopping!r}")
        if not 0.0 < self.holdout_fraction < 1.0:
            raise ValueError(f"holdout_fraction must be in (0, 1), got {self.holdout_fraction}")

    def member_configs(self) -> list[TrainConfig]:
        return [TrainConfig(seed=s, head=HeadConfig(mode=self.head_mode), max_epochs=self.max_epochs,
                            patience=self.patience, train_last_block=self.train_last_block,
                            device=self.device) for s in self.seeds[: self.members]]


@dataclass(frozen=True, kw_only=True)
class PreparedData:
    """Trunk features and hull inputs for a whole dataset, with split labels and metadata."""

    data: MemberData
    split: np.ndarray  # [N] train/val/test/loco
    clusters: np.ndarray  # [N] SOAP cluster
    compositions: list[dict[str, float]]
    ids: list[str]

    def part(self, name: str) -> MemberData:
        return subset(self.data, np.flatnonzero(self.split == name))

    def part_rows(self, idx: np.ndarray) -> MemberData:
        return subset(self.data, idx)

    def mask(self, name: str) -> np.ndarray:
        return self.split == name


def prepare(dataset_dir: str, backbone: Backbone, references: str, *,
            cache_dir: str | None = DEFAULT_CACHE, device: str = "cpu",
            splits: Collection[str] | None = None,
            clusterer: SoapClusterer | None = None) -> PreparedData:
    """Load a dataset, run the frozen trunk once, and compute leave-self-out hull inputs.

    ``splits`` keeps only the rows of those splits (None: every row), so that e.g. a report does
    not pay the trunk for training rows it never predicts. ``clusterer``: assign the SOAP
    clusters with it (a model's, on a dataset ingested from another snapshot, whose own
    ``soap_cluster`` ids number other clusters); None: the dataset's ``soap_cluster`` column.
    """
    df = load_dataset(dataset_dir)
    if splits is not None:
        df = df[df["split"].isin(list(splits))].reset_index(drop=True)
        if df.empty:
            raise ValueError(f"{dataset_dir} has no rows in splits {sorted(splits)}")
    structures = [Structure.from_str(s, fmt="json") for s in df["structure"]]
    ids = [str(i) for i in df["structure_id"]]
    feats = cached_trunk_features(backbone, structures, ids, cache_dir, device=device)
    hull = ReferenceHull.from_source(references)
    mids = [str(m) for m in df.get("material_id", df["structure_id"])]
    hull_pa, corr_pa, has_ref = hull_inputs(structures, backbone, hull, exclude_ids=mids)
    data = member_data(feats, df["energy_above_hull"].to_numpy(float), hull_pa, corr_pa, has_ref)
    comps = [{el.symbol: float(a) for el, a in s.composition.fractional_composition.items()} for s in structures]
    clusters = (df["soap_cluster"].to_numpy(int) if clusterer is None
                else clusterer.assign(structures))
    return PreparedData(data=data, split=df["split"].to_numpy(str), clusters=clusters,
                        compositions=comps, ids=ids)


def predict_prepared(ensemble: Ensemble, prepared: PreparedData, name: str | None = None) -> EnsemblePrediction:
    """Ensemble predictions for one split (or all rows when ``name`` is None)."""
    d = prepared.data if name is None else prepared.part(name)
    th = ThermoInputs(hull_pa=d.hull_pa, corr_pa=d.corr_pa, has_ref=d.has_ref)
    return ensemble.predict_feats_batched(d.feats, th)


def fit_and_stop_rows(config: EnsembleTrainConfig, split: np.ndarray,
                      compositions: list[dict[str, float]]) -> tuple[np.ndarray, np.ndarray]:
    """(rows the members fit, rows whose MAE stops them): indices into ``split`` [N] and
    ``compositions`` (element -> amount, one per row)."""
    train = np.flatnonzero(split == "train")
    if config.early_stopping == "val":
        return train, np.flatnonzero(split == "val")
    formulas = [Composition(compositions[i]).reduced_formula for i in train]
    held = holdout_rows(formulas, fraction=config.holdout_fraction)
    return train[~held], train[held]


def _train(config: EnsembleTrainConfig, prepared: PreparedData, normalizer: Normalizer) -> list[FitResult]:
    fit_idx, stop_idx = fit_and_stop_rows(config, prepared.split, prepared.compositions)
    train, val = prepared.part_rows(fit_idx), prepared.part_rows(stop_idx)
    log.info("members fit %d rows and stop early on %d %s rows", len(fit_idx), len(stop_idx),
             "val" if config.early_stopping == "val" else "held-out training")
    configs = config.member_configs()
    if config.runner == "local":
        from .loop import fit_member

        bb = load_backbone(config.backbone, device=config.device)
        return [fit_member(bb, train, val, c, normalizer=normalizer) for c in configs]
    from .ray_ensemble import RayTrainResources, train_members

    res = RayTrainResources(address=config.address, gpus_per_member=config.gpus_per_member,
                            cpus_per_member=config.cpus_per_member, max_failures=config.max_failures)
    runs = train_members(config.backbone, train, val, normalizer, configs, res)
    return [r.fit for r in sorted(runs, key=lambda r: r.index)]


def write_members(md: ModelDir, results: list[FitResult], config: EnsembleTrainConfig,
                  backbone: Backbone, normalizer: Normalizer, data_version: dict[str, Any]) -> dict[str, Any]:
    """Member tensors + normalizer + manifest (before calibration)."""
    names = []
    members = []
    for i, (r, c) in enumerate(zip(results, config.member_configs(), strict=True)):
        name = f"member_{i}.pt"
        md.write_tensors(name, r.member_state)
        names.append(name)
        members.append({"index": i, "file": name, "seed": c.seed, "epochs_run": r.epochs_run,
                        "best_epoch": r.best_epoch, "val_mae": r.val_mae, "val_spearman": r.val_spearman})
    md.write_bytes("normalizer.json", normalizer.to_json().encode())
    names.append("normalizer.json")
    cfg = asdict(config)
    cfg["head"] = asdict(HeadConfig(mode=config.head_mode))
    manifest = {
        "backbone": {**backbone.identity(), "spec": config.backbone},
        "data_version": data_version,
        "config": cfg,
        "members": members,
        "git_commit": git_commit(),
        "file_names": names,
    }
    return md.write_manifest(manifest)


def calibrate(md: ModelDir, prepared: PreparedData, backbone: Backbone,
              config: CalibratorConfig) -> Calibrator:
    """Fit conformal/OOD/triage on val (and train) predictions; add the files to the manifest."""
    ens = Ensemble.load(md.uri, backbone=backbone)
    val_pred, train_pred = predict_prepared(ens, prepared, "val"), predict_prepared(ens, prepared, "train")
    vm, tm = prepared.mask("val"), prepared.mask("train")
    cal = Calibrator.fit(val_pred, prepared.data.y.numpy()[vm], prepared.clusters[vm],
                         [c for c, k in zip(prepared.compositions, vm, strict=True) if k], train_pred,
                         [c for c, k in zip(prepared.compositions, tm, strict=True) if k], config)
    with tempfile.TemporaryDirectory() as tmp:
        paths = cal.save(tmp)
        for p in paths:
            md.write_bytes(Path(p).name, Path(p).read_bytes())
    md.add_files([Path(p).name for p in paths])
    return cal


def run(config: EnsembleTrainConfig) -> dict[str, Any]:
    """Train, write and calibrate an ensemble; returns the manifest."""
    backbone = load_backbone(config.backbone, device=config.device)
    prepared = prepare(config.data, backbone, config.references, cache_dir=config.cache_dir, device=config.device)
    normalizer = Normalizer.fit(prepared.part("train").y)
    results = _train(config, prepared, normalizer)
    md = ModelDir(uri=config.out)
    data_version = json.loads(Path(config.data, "DATA_VERSION.json").read_text())
    soap = Path(config.data, "soap_clusterer.json")
    if soap.exists():
        md.write_bytes("soap_clusterer.json", soap.read_bytes())
    write_members(md, results, replace(config), backbone, normalizer, data_version)
    if soap.exists():
        md.add_files(["soap_clusterer.json"])
    calibrate(md, prepared, backbone, config.calibration)
    return md.read_manifest()


@dataclass(frozen=True, kw_only=True)
class RecalibrateConfig:
    """Refit calibration (conformal, OOD, triage) of an existing model on a dataset's val split."""

    model: str
    data: str
    references: str
    cache_dir: str | None = DEFAULT_CACHE
    device: str = "cpu"
    calibration: CalibratorConfig = field(default_factory=CalibratorConfig)


def recalibrate(config: RecalibrateConfig) -> dict[str, Any]:
    """Members untouched; calibration files replaced and re-hashed. Returns the new manifest."""
    md = ModelDir(uri=config.model)
    manifest = md.read_manifest()
    backbone = load_backbone(manifest["backbone"]["spec"], device=config.device,
                             expected_sha256=manifest["backbone"]["weights_sha256"])
    prepared = prepare(config.data, backbone, config.references, cache_dir=config.cache_dir,
                       device=config.device)
    calibrate(md, prepared, backbone, config.calibration)
    return md.read_manifest()
