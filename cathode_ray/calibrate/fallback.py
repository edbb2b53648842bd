"""Backbone fallback for new chemical systems: the zero-shot E_hull where the heads never learned.

The heads learn a correction to the backbone's zero-shot E_hull (backbone energy minus the
reference hull) from the training chemical systems. On a chemical system that no training
structure has, that correction is an extrapolation, and measured on this repository's data it
is worse than no correction at all (``scripts/eval_new_chemistry.py``: the three largest SOAP
clusters held out of training in turn, head-only ensembles of three members, 2026-11-28):

=========  ====  ====================  ===================  ==================================
held out   rows  MAE ensemble / zs      Spearman ens. / zs   90 % coverage ensemble / shipped
=========  ====  ====================  ===================  ==================================
cluster 0  335   0.036 / 0.015         0.725 / 0.690        0.973 / 0.988
cluster 3  312   0.072 / 0.019         0.750 / 0.897        0.183 / 0.978
cluster 6  509   0.051 / 0.035         0.838 / 0.760        0.772 / 0.857
=========  ====  ====================  ===================  ==================================

Holding out a fifth of the chemical systems at a time instead (``--hold-out chemsys``: the
structure families stay in training, only the element sets are new; 1,167 rows in five folds) the
pooled MAE was 0.041 for the ensemble and 0.025 for the zero-shot value; the heads won one fold
(428 rows: 0.027 vs 0.035), tied two and lost two, and the widened interval covered more in all five
(pooled 0.93 vs 0.89). Triage there kept about as many new-chemistry structures, more precisely:
40 KEEP at precision 0.95 with the fallback against 46 at 0.87 without it, and no false kill
either way.

99-100 % of the held-out clusters' rows had an element set absent from training, against 0-1 % of the
in-domain (val) rows, so the rule is: a structure whose element set matches no training structure
(``OODResult.composition_jaccard > max_jaccard``, default 0) and that has a reference hull
gets the backbone's zero-shot E_hull as its estimate. Its interval is the union of the
ensemble's calibrated interval and a conformal interval around the zero-shot value, fitted on
the calibration split's zero-shot residuals, and its p_stable / p_metastable are the share of
those residuals that put it below 0.05 / 0.10 eV/atom (the heads' probabilities carry the same
correction as their median). The backbone's errors do not depend on which chemical systems the
heads were trained on, so they carry over to a new one (coverage above). Rows without a
reference hull keep the ensemble's estimate (there is no zero-shot value to fall back to).

Energies in eV/atom. Pure numpy.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from cathode_ray import seedcard
from cathode_ray.calibrate.aggregate import Aggregated
from cathode_ray.calibrate.conformal import fit_conformal, float_from_json, float_to_json

#: ``e_hull_source`` values: which estimate a result row carries.
ENSEMBLE, ZERO_SHOT = "ensemble", "zero_shot"


@dataclass(frozen=True, kw_only=True)
class ZeroShotFallback:
    """Conformal offsets around the backbone's zero-shot E_hull and when to use them.

    Attributes:
        alpha: target miscoverage of the zero-shot interval (1 - coverage).
        d_lo, d_hi: the interval is [zs - d_lo, zs + d_hi], eV/atom (asymmetric CQR on a
            zero-width interval: each tail at alpha / 2).
        n_calib: calibration rows with a zero-shot value behind the offsets.
        max_jaccard: rows whose composition Jaccard distance to the nearest training element
            set exceeds this fall back (0: any element set not seen in training).
        residuals: the calibration rows' y - zero-shot, sorted (eV/atom); they give the fallback
            rows' p_stable and p_metastable (empty: keep the heads' probabilities).
    """

    alpha: float
    d_lo: float
    d_hi: float
    n_calib: int
    max_jaccard: float = 0.0
    residuals: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if not 0.0 < self.alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha}")
        if not 0.0 <= self.max_jaccard < 1.0:
            raise ValueError(f"max_jaccard must be in [0, 1), got {self.max_jaccard}")

    @classmethod
    def fit(cls, zero_shot: np.ndarray, y: np.ndarray, *,
            coverage: float = seedcard.TARGET_COVERAGE, max_jaccard: float = 0.0) -> ZeroShotFallback:
        """Offsets from calibration rows: zero-shot E_hull [N] (NaN without a reference) and
        labels y [N], eV/atom. With no usable row the offsets are +inf (an unbounded interval)."""
        zs, y = np.asarray(zero_shot, dtype=np.float64), np.asarray(y, dtype=np.float64)
        cqr = fit_conformal(zs, zs, y, method="asymmetric", coverage=coverage)  # global; NaN rows dropped
        ok = np.isfinite(zs) & np.isfinite(y)
        return cls(alpha=cqr.alpha, d_lo=cqr.d_lo, d_hi=cqr.d_hi, n_calib=cqr.n_calib,
                   max_jaccard=max_jaccard, residuals=tuple(float(r) for r in np.sort(y[ok] - zs[ok])))

    def probability_below(self, zero_shot: np.ndarray, threshold: float) -> np.ndarray:
        """P(E_hull < threshold) [N] for zero-shot values [N] (eV/atom): the share of calibration
        residuals r with zero_shot + r < threshold."""
        r = np.asarray(self.residuals, dtype=np.float64)
        return np.searchsorted(r, threshold - np.asarray(zero_shot, dtype=np.float64), side="left") / len(r)

    def rows(self, composition_jaccard: np.ndarray, zero_shot: np.ndarray) -> np.ndarray:
        """Boolean [N]: new chemical system with a zero-shot value (NaN = no reference hull)."""
        return (np.asarray(composition_jaccard) > self.max_jaccard) & np.isfinite(zero_shot)

    def apply(self, agg: Aggregated, lo_cal: np.ndarray, hi_cal: np.ndarray, zero_shot: np.ndarray,
              use: np.ndarray) -> tuple[Aggregated, np.ndarray, np.ndarray]:
        """(estimate, lo [N], hi [N]) where ``use`` [N]: q50 is the zero-shot E_hull, the interval
        widened to include the zero-shot interval, and p_stable / p_metastable come from the
        zero-shot residuals (the heads' probabilities carry their correction); other rows unchanged."""
        zs = np.where(use, zero_shot, 0.0)  # [N]; NaN-free where unused
        lo = np.where(use, np.minimum(lo_cal, zs - self.d_lo), lo_cal)
        hi = np.where(use, np.maximum(hi_cal, zs + self.d_hi), hi_cal)
        est = replace(agg, q50=np.where(use, zs, agg.q50))
        if self.residuals:
            est = replace(
                est, p_stable=np.where(use, self.probability_below(zs, seedcard.STABLE_EHULL), agg.p_stable),
                p_metastable=np.where(use, self.probability_below(zs, seedcard.METASTABLE_EHULL),
                                      agg.p_metastable))
        return est, lo, hi

    def to_dict(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "d_lo": float_to_json(self.d_lo), "d_hi": float_to_json(self.d_hi),
                "n_calib": self.n_calib, "max_jaccard": self.max_jaccard, "residuals": list(self.residuals)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ZeroShotFallback:
        return cls(alpha=float(d["alpha"]), d_lo=float_from_json(d["d_lo"]), d_hi=float_from_json(d["d_hi"]),
                   n_calib=int(d["n_calib"]), max_jaccard=float(d["max_jaccard"]),
                   residuals=tuple(float(r) for r in d.get("residuals", ())))
