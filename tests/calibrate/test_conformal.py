import json
import math

import numpy as np
import pytest

from cathode_ray.calibrate.aggregate import aggregate
from cathode_ray.calibrate.conformal import ConformalParams, conformal_quantile, fit_conformal


def test_conformal_quantile_finite_sample_level() -> None:
    scores = np.arange(1.0, 11.0)  # n = 10
    # alpha 0.2: level ceil(11 * 0.8) / 10 = 0.9; np.quantile(method="higher") at 0.9 on 10
    # points has virtual index 8.1 -> index 9 (one rank above the textbook 9th order statistic)
    assert conformal_quantile(scores, 0.2) == 10.0
    # alpha 0.5: level ceil(5.5) / 10 = 0.6 -> virtual index 5.4 -> index 6 -> value 7
    assert conformal_quantile(scores, 0.5) == 7.0
    # alpha 0.05: ceil(11 * 0.95) / 10 = 1.1 > 1 -> infinite offset
    assert conformal_quantile(scores, 0.05) == math.inf
    assert conformal_quantile(np.zeros(0), 0.1) == math.inf


def test_conformal_rank_is_exact_where_floating_point_is_not() -> None:
    # n = 99, alpha = 0.45: (n + 1)(1 - alpha) = 55 exactly, 55.00000000000001 in floats (rank 56)
    assert (99 + 1) * (1.0 - 0.45) > 55
    scores = np.arange(1.0, 100.0)
    # level 55 / 99 -> virtual index 98 * 55 / 99 = 54.4 -> index 55 -> value 56 (57 with rank 56)
    assert conformal_quantile(scores, 0.45) == 56.0


@pytest.mark.parametrize("method", ["symmetric", "asymmetric"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_coverage_near_nominal_heteroscedastic(synth, method: str, seed: int) -> None:
    pred, y, _, _ = synth(8000, seed)
    agg = aggregate(pred)
    cal, test = slice(0, 4000), slice(4000, 8000)
    raw_cov = np.mean((agg.lo[test] <= y[test]) & (y[test] <= agg.hi[test]))
    params = fit_conformal(agg.lo[cal], agg.hi[cal], y[cal], method=method, coverage=0.9)
    lo, hi = params.apply(agg.lo[test], agg.hi[test])
    cov = np.mean((lo <= y[test]) & (y[test] <= hi))
    assert raw_cov < 0.85  # the raw interval is too narrow
    assert abs(cov - 0.9) <= 0.02


def test_asymmetric_tails_each_near_half_alpha(synth) -> None:
    pred, y, _, _ = synth(8000, 5)
    agg = aggregate(pred)
    params = fit_conformal(agg.lo[:4000], agg.hi[:4000], y[:4000], method="asymmetric")
    lo, hi = params.apply(agg.lo[4000:], agg.hi[4000:])
    assert abs(np.mean(y[4000:] < lo) - 0.05) < 0.015
    assert abs(np.mean(y[4000:] > hi) - 0.05) < 0.015


def test_mondrian_small_cluster_falls_back_to_global() -> None:
    rng = np.random.default_rng(0)
    n = 400
    y = rng.normal(size=n)
    lo, hi = np.full(n, -0.5), np.full(n, 0.5)
    clusters = np.r_[np.zeros(380, dtype=int), np.ones(20, dtype=int)]
    y[380:] *= 10.0  # cluster 1 is wild but too small for its own offsets
    params = fit_conformal(lo, hi, y, clusters, method="symmetric", min_points=50)
    assert 0 in params.cluster_d_lo and 1 not in params.cluster_d_lo
    assert params.cluster_counts == {0: 380, 1: 20}
    lo_c, hi_c = params.apply(np.zeros(3), np.zeros(3), np.array([0, 1, 7]))
    assert hi_c[0] == pytest.approx(params.cluster_d_hi[0])
    assert hi_c[1] == pytest.approx(params.d_hi) and hi_c[2] == pytest.approx(params.d_hi)
    assert params.d_hi != pytest.approx(params.cluster_d_hi[0])
    np.testing.assert_allclose(-lo_c, hi_c)


def test_mondrian_gives_per_cluster_coverage(synth) -> None:
    pred, y, clusters, _ = synth(8000, 3)
    agg = aggregate(pred)
    params = fit_conformal(agg.lo[:4000], agg.hi[:4000], y[:4000], clusters[:4000])
    lo, hi = params.apply(agg.lo[4000:], agg.hi[4000:], clusters[4000:])
    inside = (lo <= y[4000:]) & (y[4000:] <= hi)
    for c in range(4):
        assert abs(inside[clusters[4000:] == c].mean() - 0.9) < 0.04


def test_params_json_round_trip_exact() -> None:
    rng = np.random.default_rng(1)
    y = rng.normal(size=120)
    params = fit_conformal(np.full(120, -1.0), np.full(120, 1.0), y, np.repeat([0, 1, 2], 40),
                           method="asymmetric", min_points=40)
    params = ConformalParams(**{**params.__dict__, "cluster_d_lo": {**params.cluster_d_lo,
                                                                    5: math.inf}, "cluster_d_hi": {**params.cluster_d_hi, 5: 0.1}})
    text = json.dumps(params.to_dict(), allow_nan=False)
    assert ConformalParams.from_dict(json.loads(text)) == params


def test_crossing_bounds_collapse_to_midpoint() -> None:
    params = ConformalParams(method="symmetric", alpha=0.1, d_lo=-0.3, d_hi=-0.3, n_calib=10)
    lo, hi = params.apply(np.array([0.0, 0.0]), np.array([1.0, 0.2]))
    np.testing.assert_allclose(lo, [0.3, 0.1])
    np.testing.assert_allclose(hi, [0.7, 0.1])


def test_invalid_method_rejected() -> None:
    with pytest.raises(ValueError):
        fit_conformal(np.zeros(3), np.zeros(3), np.zeros(3), method="nope")
