"""The fitted calibration bundle: aggregation + CQR + OOD gates + backbone fallback + triage.

``Calibrator.fit`` runs once on validation (calibration) and training predictions;
``Calibrator.apply`` is cheap per batch (no refitting: cluster lookups, kNN queries, numpy):
aggregate the members, calibrate the interval, score OOD, fall back to the backbone's zero-shot
E_hull on new chemical systems (:mod:`cathode_ray.calibrate.fallback`), triage.
Persisted as conformal_params.json, triage.json, ood_params.json and ood_train.npz.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from cathode_ray import seedcard
from cathode_ray.calibrate.aggregate import Aggregated, aggregate
from cathode_ray.calibrate.conformal import METHODS, ConformalParams, fit_conformal
from cathode_ray.calibrate.fallback import ENSEMBLE, ZERO_SHOT, ZeroShotFallback
from cathode_ray.calibrate.ood import OODConfig, OODModel, OODResult
from cathode_ray.calibrate.triage import TriageConfig, choose_thresholds, triage
from cathode_ray.model.prediction import EnsemblePrediction

CONFORMAL_FILE = "conformal_params.json"
TRIAGE_FILE = "triage.json"
RESULT_COLUMNS: tuple[str, ...] = (
    "e_hull_pred", "e_hull_lo", "e_hull_hi", "q10", "q90", "epistemic_std", "aleatoric_width",
    "p_stable", "p_metastable", "ood_score", "ood_gates", "decision", "decision_reason",
    "e_hull_source",
)


@dataclass(frozen=True, kw_only=True)
class CalibratorConfig:
    """How to fit a :class:`Calibrator`.

    Attributes:
        method: default conformal method used by ``apply`` ("symmetric" or "asymmetric";
            both are always fitted).
        target_coverage: nominal coverage of the calibrated interval.
        min_points: Mondrian minimum calibration points per SOAP cluster.
        ood: OOD gate configuration.
        triage: fixed triage thresholds, or None to choose them on validation.
        min_keep_precision: KEEP precision target when choosing thresholds.
        keep_precision_z: the target must hold for the one-sided Wilson lower bound at this z
            (1.2816: 90 % confidence on the validation sample; 0: the plain ratio).
        epistemic_reference: "val" or "train": which rows define the disagreement gate's
            percentile scale (training rows are over-fitted, so their spread is too small).
        zero_shot_fallback: report the backbone's zero-shot E_hull for new chemical systems
            (:mod:`cathode_ray.calibrate.fallback`); False keeps the ensemble's estimate everywhere.
    """

    method: str = "asymmetric"
    target_coverage: float = seedcard.TARGET_COVERAGE
    min_points: int = seedcard.MONDRIAN_MIN_POINTS
    ood: OODConfig = field(default_factory=OODConfig)
    triage: TriageConfig | None = None
    min_keep_precision: float = 0.93
    keep_precision_z: float = 1.2816
    epistemic_reference: str = "val"
    zero_shot_fallback: bool = True

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if not 0.0 < self.target_coverage < 1.0:
            raise ValueError(f"target_coverage must be in (0, 1), got {self.target_coverage}")
        if not 0.0 < self.min_keep_precision <= 1.0:
            raise ValueError("min_keep_precision must be in (0, 1]")
        if self.epistemic_reference not in ("val", "train"):
            raise ValueError("epistemic_reference must be 'val' or 'train'")


def clip_at_zero(lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bounds [N] (eV/atom) clipped at 0, as :class:`Estimate` holds them: clipping never moves a
    bound past a true E_hull (>= 0), and a bound below 0 then covers a structure on the hull."""
    return np.maximum(lo, 0.0), np.maximum(hi, 0.0)


@dataclass(frozen=True)
class Estimate:
    """What triage decides on, per structure; arrays [N], energies in eV/atom.

    E_hull is >= 0 by definition (a structure below the hull would itself be on it), so the
    estimate and its bounds are clipped at 0. A negative raw value means "below the known reference
    hull"; it survives in the raw member quantiles (q10/q90) and in ``zero_shot_ehull``.

    Attributes:
        agg: the aggregated ensemble, its q50 replaced by the zero-shot E_hull on fallback rows,
            then clipped at 0.
        lo, hi: calibrated bounds (widened on fallback rows), clipped at 0.
        ood: OOD gates and score.
        fallback: bool, the row took the backbone fallback (:mod:`cathode_ray.calibrate.fallback`).
    """

    agg: Aggregated
    lo: np.ndarray
    hi: np.ndarray
    ood: OODResult
    fallback: np.ndarray


class Calibrator:
    """Aggregation + conformal params (both methods) + OOD model + backbone fallback (None: off)
    + triage thresholds."""

    def __init__(self, *, conformal: dict[str, ConformalParams], method: str, ood: OODModel,
                 triage_config: TriageConfig, triage_reasoning: str = "",
                 fallback: ZeroShotFallback | None = None) -> None:
        if method not in conformal:
            raise ValueError(f"no conformal params for method {method!r}")
        self.conformal = conformal
        self.method = method
        self.ood = ood
        self.triage_config = triage_config
        self.triage_reasoning = triage_reasoning
        self.fallback = fallback

    @property
    def params(self) -> ConformalParams:
        """Conformal params of the default method."""
        return self.conformal[self.method]

    @classmethod
    def fit(cls, val_pred: EnsemblePrediction, y_val: np.ndarray, val_clusters: np.ndarray | None,
            val_compositions: Sequence[Mapping[str, float]], train_pred: EnsemblePrediction,
            train_compositions: Sequence[Mapping[str, float]],
            config: CalibratorConfig | None = None) -> Calibrator:
        """Fit on validation predictions/labels y_val [N] (eV/atom) and training predictions."""
        cfg = config or CalibratorConfig()
        agg = aggregate(val_pred)
        conformal = {m: fit_conformal(agg.lo, agg.hi, y_val, val_clusters, method=m,
                                      coverage=cfg.target_coverage, min_points=cfg.min_points)
                     for m in METHODS}
        ref = agg if cfg.epistemic_reference == "val" else aggregate(train_pred)
        ood = OODModel.fit(train_pred.embedding, train_compositions, ref.epistemic_std, cfg.ood)
        fallback = (ZeroShotFallback.fit(val_pred.zero_shot_ehull, y_val, coverage=cfg.target_coverage)
                    if cfg.zero_shot_fallback else None)
        if cfg.triage is not None:
            tri, text = cfg.triage, "Triage thresholds fixed by configuration."
        else:
            # thresholds are chosen on the estimate triage will see (a calibrator without them yet)
            untriaged = cls(conformal=conformal, method=cfg.method, ood=ood, triage_config=TriageConfig(),
                            fallback=fallback)
            est = untriaged.estimate(val_pred, val_clusters, val_compositions)
            tri, text = choose_thresholds(est.agg, est.lo, est.hi, y_val, ood=est.ood,
                                          precision_z=cfg.keep_precision_z,
                                          min_keep_precision=cfg.min_keep_precision)
        return cls(conformal=conformal, method=cfg.method, ood=ood, triage_config=tri,
                   triage_reasoning=text, fallback=fallback)

    def calibrated(self, agg: Aggregated, clusters: np.ndarray | None,
                   method: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The ensemble's calibrated bounds (lo [N], hi [N]) in eV/atom with the given or default
        method (before the backbone fallback)."""
        return self.conformal[method or self.method].apply(agg.lo, agg.hi, clusters)

    def estimate(self, pred: EnsemblePrediction, clusters: np.ndarray | None,
                 compositions: Sequence[Mapping[str, float]], method: str | None = None) -> Estimate:
        """Aggregate, calibrate (given or default method), score OOD, apply the backbone fallback,
        clip at 0 (see :class:`Estimate`)."""
        agg = aggregate(pred)
        lo_cal, hi_cal = self.calibrated(agg, clusters, method)
        ood = self.ood.score(pred.embedding, compositions, agg.epistemic_std)
        use = np.zeros(len(agg), dtype=bool)
        if self.fallback is not None:
            use = self.fallback.rows(ood.composition_jaccard, pred.zero_shot_ehull)
            agg, lo_cal, hi_cal = self.fallback.apply(agg, lo_cal, hi_cal, pred.zero_shot_ehull, use)
        # Clipping never moves an estimate away from a true E_hull (>= 0) and never uncovers one.
        lo, hi = clip_at_zero(lo_cal, hi_cal)
        return Estimate(agg=replace(agg, q50=np.maximum(agg.q50, 0.0)), lo=lo, hi=hi, ood=ood, fallback=use)

    def apply(self, pred: EnsemblePrediction, clusters: np.ndarray | None,
              compositions: Sequence[Mapping[str, float]], method: str | None = None,
              ) -> dict[str, np.ndarray]:
        """Result columns (RESULT_COLUMNS), each [N]; energies in eV/atom."""
        return self.columns(self.estimate(pred, clusters, compositions, method))

    def columns(self, e: Estimate) -> dict[str, np.ndarray]:
        """Triage ``e`` and lay it out as the result columns (RESULT_COLUMNS), each [N]."""
        a = e.agg
        decision, reason = triage(a, e.lo, e.hi, e.ood, self.triage_config)
        return {
            "e_hull_pred": a.q50, "e_hull_lo": e.lo, "e_hull_hi": e.hi,
            "q10": a.lo, "q90": a.hi, "epistemic_std": a.epistemic_std,
            "aleatoric_width": a.aleatoric_width, "p_stable": a.p_stable,
            "p_metastable": a.p_metastable, "ood_score": e.ood.ood_score,
            "ood_gates": e.ood.ood_gates, "decision": decision, "decision_reason": reason,
            "e_hull_source": np.where(e.fallback, ZERO_SHOT, ENSEMBLE).astype(object),
        }

    def save(self, model_dir: str | Path) -> list[Path]:
        """Write all calibration files into ``model_dir``; returns the paths written."""
        model_dir = Path(model_dir)
        model_dir.mkdir(parents=True, exist_ok=True)
        conf = {"method": self.method,
                "params": {m: p.to_dict() for m, p in self.conformal.items()},
                "zero_shot_fallback": None if self.fallback is None else self.fallback.to_dict()}
        tri = {"config": self.triage_config.to_dict(), "reasoning": self.triage_reasoning}
        p_conf, p_tri = model_dir / CONFORMAL_FILE, model_dir / TRIAGE_FILE
        p_conf.write_text(json.dumps(conf, indent=2, sort_keys=True))
        p_tri.write_text(json.dumps(tri, indent=2, sort_keys=True))
        return [p_conf, p_tri, *self.ood.save(model_dir)]

    @classmethod
    def from_files(cls, files: Mapping[str, bytes], *, where: str = "model") -> Calibrator:
        """Calibrator from already hash-verified model files (name -> bytes), e.g.
        ``Ensemble.files``; works for local and s3:// model directories alike."""
        if CONFORMAL_FILE not in files:
            raise FileNotFoundError(
                f"{where} is not calibrated (no {CONFORMAL_FILE}); run `cathode-ray train` to the end"
            )
        with tempfile.TemporaryDirectory() as tmp:
            for name, data in files.items():
                if name.endswith((".json", ".npz")):
                    Path(tmp, name).write_bytes(data)
            return cls.load(tmp)

    @classmethod
    def load(cls, model_dir: str | Path) -> Calibrator:
        """Rebuild a calibrator written by :meth:`save`."""
        model_dir = Path(model_dir)
        conf = json.loads((model_dir / CONFORMAL_FILE).read_text())
        tri = json.loads((model_dir / TRIAGE_FILE).read_text())
        fallback = conf.get("zero_shot_fallback")  # absent in models calibrated before it existed
        return cls(
            conformal={m: ConformalParams.from_dict(d) for m, d in conf["params"].items()},
            method=conf["method"], ood=OODModel.load(model_dir),
            triage_config=TriageConfig.from_dict(tri["config"]),
            triage_reasoning=str(tri["reasoning"]),
            fallback=None if fallback is None else ZeroShotFallback.from_dict(fallback),
        )
