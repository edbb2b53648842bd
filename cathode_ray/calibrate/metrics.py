"""Screening metrics (pure numpy / scipy). Energies in eV/atom; "stable" = true E_hull < 0.05.

Definitions (all inputs [N]; NaN where a ratio has an empty denominator):

* spearman: rank correlation of prediction and truth.
* mae: mean |pred - y| (eV/atom).
* coverage: fraction with lo <= y <= hi; median_width: median(hi - lo) (eV/atom).
* ef10: stable fraction among the floor(10% N) (at least 1) lowest predictions divided by the
  overall stable fraction (ties broken by a stable sort).
* frac_stable_top100: stable fraction among the min(100, N) lowest predictions.
* f1 / daf (Matbench Discovery at the stable threshold): predicted stable = pred < 0.05;
  precision = TP / (TP + FP), recall = TP / (TP + FN), F1 = 2PR / (P + R),
  DAF = precision / prevalence with prevalence = (TP + FN) / N.
* keep_precision / keep_recall: KEEP counted as predicted stable.
* kill_precision: fraction of KILLs that are truly unstable.
* false_kill_rate: truly stable marked KILL / truly stable.
* frac_keep / frac_kill: fraction of rows with that decision.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import spearmanr

from cathode_ray import seedcard
from cathode_ray.calibrate.aggregate import Aggregated


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den > 0 else math.nan


def spearman(y: np.ndarray, pred: np.ndarray) -> float:
    """Spearman rank correlation of pred [N] with y [N]; NaN if fewer than 2 rows or constant."""
    if len(y) < 2 or np.ptp(y) == 0 or np.ptp(pred) == 0:
        return math.nan
    return float(spearmanr(y, pred).statistic)


def mae(y: np.ndarray, pred: np.ndarray) -> float:
    """Mean absolute error, eV/atom."""
    return float(np.mean(np.abs(np.asarray(pred) - np.asarray(y)))) if len(y) else math.nan


def coverage(y: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> float:
    """Fraction of y [N] inside [lo, hi] (inclusive)."""
    return float(np.mean((lo <= y) & (y <= hi))) if len(y) else math.nan


def median_width(lo: np.ndarray, hi: np.ndarray) -> float:
    """Median interval width, eV/atom."""
    return float(np.median(hi - lo)) if len(lo) else math.nan


def _lowest(pred: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(pred, kind="stable")[:k]


def enrichment_factor(y: np.ndarray, pred: np.ndarray, frac: float = 0.1,
                      threshold: float = seedcard.STABLE_EHULL) -> float:
    """Stable fraction among the floor(frac N) (>= 1) lowest predictions / overall stable
    fraction."""
    stable = np.asarray(y) < threshold
    k = max(1, int(frac * len(y)))
    return _ratio(stable[_lowest(pred, k)].mean(), stable.mean()) if len(y) else math.nan


def frac_stable_top(y: np.ndarray, pred: np.ndarray, k: int = 100,
                    threshold: float = seedcard.STABLE_EHULL) -> float:
    """Stable fraction among the min(k, N) lowest predictions."""
    if len(y) == 0:
        return math.nan
    return float((np.asarray(y)[_lowest(pred, min(k, len(y)))] < threshold).mean())


def _confusion(true_pos: np.ndarray, pred_pos: np.ndarray) -> tuple[int, int, int, int]:
    """(TP, FP, FN, TN) counts from boolean arrays [N]."""
    tp = int((true_pos & pred_pos).sum())
    fp = int((~true_pos & pred_pos).sum())
    fn = int((true_pos & ~pred_pos).sum())
    return tp, fp, fn, int(len(true_pos) - tp - fp - fn)


def classification(y: np.ndarray, pred: np.ndarray,
                   threshold: float = seedcard.STABLE_EHULL) -> dict[str, float]:
    """Precision, recall, F1 and DAF with predicted stable = pred < threshold (eV/atom)."""
    tp, fp, fn, _ = _confusion(np.asarray(y) < threshold, np.asarray(pred) < threshold)
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    f1 = _ratio(2 * tp, 2 * tp + fp + fn)
    prevalence = _ratio(tp + fn, len(y))
    return {"precision": precision, "recall": recall, "f1": f1,
            "daf": _ratio(precision, prevalence) if not math.isnan(precision) else math.nan}


def decision_metrics(y: np.ndarray, decisions: np.ndarray,
                     threshold: float = seedcard.STABLE_EHULL) -> dict[str, float]:
    """KEEP precision/recall, KILL precision, false-kill rate, KEEP/KILL fractions."""
    stable = np.asarray(y) < threshold
    keep, kill = decisions == "KEEP", decisions == "KILL"
    n = len(y)
    return {
        "keep_precision": _ratio((keep & stable).sum(), keep.sum()),
        "keep_recall": _ratio((keep & stable).sum(), stable.sum()),
        "kill_precision": _ratio((kill & ~stable).sum(), kill.sum()),
        "false_kill_rate": _ratio((kill & stable).sum(), stable.sum()),
        "frac_keep": _ratio(keep.sum(), n),
        "frac_kill": _ratio(kill.sum(), n),
    }


def point_metrics(y: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """Metrics for a point predictor (eV/atom) [N]; rows with non-finite pred are dropped
    (``n`` counts the rows used)."""
    y, pred = np.asarray(y, dtype=np.float64), np.asarray(pred, dtype=np.float64)
    ok = np.isfinite(pred) & np.isfinite(y)
    y, pred = y[ok], pred[ok]
    cls = classification(y, pred)
    return {"n": float(len(y)), "spearman": spearman(y, pred), "mae": mae(y, pred),
            "f1": cls["f1"], "daf": cls["daf"], "ef10": enrichment_factor(y, pred),
            "frac_stable_top100": frac_stable_top(y, pred)}


def scored_rows(y: np.ndarray, q50: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Rows [N] bool that point and interval metrics score: a finite label and q50, and bounds
    that are not NaN (an infinite bound is a bound)."""
    return (np.isfinite(np.asarray(y, dtype=np.float64)) & np.isfinite(np.asarray(q50, dtype=np.float64))
            & ~np.isnan(np.asarray(lo, dtype=np.float64)) & ~np.isnan(np.asarray(hi, dtype=np.float64)))


def all_metrics(y: np.ndarray, agg: Aggregated, lo_cal: np.ndarray, hi_cal: np.ndarray,
                decisions: np.ndarray) -> dict[str, float]:
    """Every metric for one split: point metrics of q50, interval metrics of the calibrated
    bounds [N] (eV/atom), classification and decision metrics.

    As in :func:`point_metrics`, rows whose label or q50 is not finite, or whose bounds are NaN,
    are left out of the point and interval metrics (``n`` counts the rows used, ``n_nonfinite``
    the others); the decision metrics count every labelled row, since every row gets a decision."""
    y = np.asarray(y, dtype=np.float64)
    q50, lo, hi = (np.asarray(a, dtype=np.float64) for a in (agg.q50, lo_cal, hi_cal))
    labelled = np.isfinite(y)
    ok = scored_rows(y, q50, lo, hi)
    yk, q50, lo, hi = y[ok], q50[ok], lo[ok], hi[ok]
    cls = classification(yk, q50)
    return {
        "n": float(ok.sum()),
        "n_nonfinite": float(len(y) - ok.sum()),
        "spearman": spearman(yk, q50),
        "mae": mae(yk, q50),
        "coverage": coverage(yk, lo, hi),
        "median_width": median_width(lo, hi),
        "ef10": enrichment_factor(yk, q50),
        "frac_stable_top100": frac_stable_top(yk, q50),
        "precision": cls["precision"], "recall": cls["recall"],
        "f1": cls["f1"], "daf": cls["daf"],
        **decision_metrics(y[labelled], np.asarray(decisions)[labelled]),
    }
