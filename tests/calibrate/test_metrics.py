import math

import numpy as np
import pytest
from scipy.stats import spearmanr

from cathode_ray.calibrate.aggregate import Aggregated
from cathode_ray.calibrate.metrics import (
    all_metrics,
    classification,
    coverage,
    decision_metrics,
    enrichment_factor,
    frac_stable_top,
    mae,
    median_width,
    point_metrics,
    spearman,
)

# 10 rows: y stable (< 0.05) at indices 0, 1, 5
Y = np.array([0.00, 0.04, 0.10, 0.20, 0.30, 0.01, 0.50, 0.06, 0.70, 0.08])
P = np.array([0.01, 0.06, 0.02, 0.20, 0.30, 0.00, 0.40, 0.07, 0.60, 0.09])


def test_spearman_mae() -> None:
    assert spearman(np.arange(5.0), np.arange(5.0) ** 3) == pytest.approx(1.0)
    assert spearman(np.arange(5.0), -np.arange(5.0)) == pytest.approx(-1.0)
    # ranks y: 1,2,3 ; pred: 1,3,2 -> d^2 = 0+1+1 -> 1 - 6*2/(3*8) = 0.5
    assert spearman(np.array([1.0, 2.0, 3.0]), np.array([1.0, 3.0, 2.0])) == pytest.approx(0.5)
    assert mae(np.array([0.0, 1.0]), np.array([0.5, 0.0])) == pytest.approx(0.75)
    assert math.isnan(spearman(np.ones(3), np.arange(3.0)))


def test_interval_metrics() -> None:
    y = np.array([0.0, 0.5, 1.0, 2.0])
    lo, hi = np.array([0.0, 0.6, 0.5, 1.0]), np.array([0.1, 0.9, 1.0, 1.5])
    assert coverage(y, lo, hi) == pytest.approx(0.5)  # inclusive bounds: rows 0 and 2
    assert median_width(lo, hi) == pytest.approx(0.4)  # widths 0.1, 0.3, 0.5, 0.5


def test_enrichment_and_top_k() -> None:
    # lowest 10% = 1 row: index 5 (pred 0.00), stable -> 1.0 / 0.3
    assert enrichment_factor(Y, P) == pytest.approx(1.0 / 0.3)
    # lowest 3 predictions: idx 5, 0, 2 -> 2 stable of 3
    assert frac_stable_top(Y, P, k=3) == pytest.approx(2 / 3)
    assert frac_stable_top(Y, P) == pytest.approx(0.3)  # k > N uses all rows


def test_f1_daf_matbench_style() -> None:
    # predicted stable (P < 0.05): idx 0, 2, 5 -> TP = 2 (0, 5), FP = 1 (2), FN = 1 (1)
    m = classification(Y, P)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["daf"] == pytest.approx((2 / 3) / 0.3)


def test_decision_metrics() -> None:
    dec = np.array(["KEEP", "KILL", "KEEP", "KILL", "KILL", "MAYBE", "KILL", "MAYBE",
                    "MAYBE", "MAYBE"], dtype=object)
    m = decision_metrics(Y, dec)
    assert m["keep_precision"] == pytest.approx(0.5)  # KEEP idx 0 (stable), 2 (not)
    assert m["keep_recall"] == pytest.approx(1 / 3)
    assert m["kill_precision"] == pytest.approx(0.75)  # KILL idx 1 stable; 3, 4, 6 unstable
    assert m["false_kill_rate"] == pytest.approx(1 / 3)
    assert m["frac_keep"] == pytest.approx(0.2) and m["frac_kill"] == pytest.approx(0.4)
    none = decision_metrics(Y, np.full(10, "MAYBE", dtype=object))
    assert math.isnan(none["keep_precision"]) and none["false_kill_rate"] == 0.0


def test_point_metrics_drop_nan_and_all_metrics() -> None:
    pred = P.copy()
    pred[3] = np.nan
    pm = point_metrics(Y, pred)
    assert pm["n"] == 9.0
    assert pm["mae"] == pytest.approx(np.mean(np.abs(np.delete(P - Y, 3))))
    agg = Aggregated(q50=P, lo=P - 0.05, hi=P + 0.05, epistemic_std=np.zeros(10),
                     aleatoric_width=np.zeros(10), p_stable=np.zeros(10),
                     p_metastable=np.zeros(10))
    dec = np.full(10, "MAYBE", dtype=object)
    am = all_metrics(Y, agg, agg.lo, agg.hi, dec)
    # |P - Y| = .01 .02 .08 0 0 .01 .1 .01 .1 .01 -> outside +-0.05: idx 2, 6, 8
    assert am["coverage"] == pytest.approx(0.7)
    assert am["median_width"] == pytest.approx(0.1)
    assert am["f1"] == pytest.approx(2 / 3) and am["frac_keep"] == 0.0


def test_all_metrics_leave_out_non_finite_predictions_but_not_infinite_bounds() -> None:
    q50 = P.copy()
    q50[3] = np.nan  # a member that gave NaN
    lo, hi = P - 0.05, P + 0.05
    hi[2] = np.inf  # a cluster too small to calibrate: an infinite, still valid, bound
    agg = Aggregated(q50=q50, lo=lo, hi=hi, epistemic_std=np.zeros(10), aleatoric_width=np.zeros(10),
                     p_stable=np.zeros(10), p_metastable=np.zeros(10))
    dec = np.array(["KILL"] + ["MAYBE"] * 9, dtype=object)
    am = all_metrics(Y, agg, lo, hi, dec)
    assert am["n"] == 9.0 and am["n_nonfinite"] == 1.0
    keep = np.arange(10) != 3
    assert am["spearman"] == pytest.approx(spearmanr(Y[keep], P[keep]).statistic)
    assert am["mae"] == pytest.approx(np.mean(np.abs(P - Y)[keep]))
    # outside +-0.05 were idx 2, 6, 8; idx 2 is now covered by its infinite bound
    assert am["coverage"] == pytest.approx(7 / 9)
    assert am["frac_kill"] == pytest.approx(0.1)  # decisions count every labelled row
