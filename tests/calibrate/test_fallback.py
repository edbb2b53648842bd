"""The backbone fallback: zero-shot E_hull and interval on new chemical systems (eV/atom)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from cathode_ray.calibrate.aggregate import aggregate
from cathode_ray.calibrate.calibrator import Calibrator, CalibratorConfig
from cathode_ray.calibrate.conformal import conformal_quantile
from cathode_ray.calibrate.fallback import ENSEMBLE, ZERO_SHOT, ZeroShotFallback


def test_fit_offsets_are_conformal_quantiles_of_the_zero_shot_residuals() -> None:
    rng = np.random.default_rng(0)
    y = rng.uniform(0, 0.3, 500)
    zs = y + 0.02 + 0.03 * rng.standard_normal(500)
    zs[:50] = np.nan  # no reference hull: not used
    fb = ZeroShotFallback.fit(zs, y, coverage=0.9)
    resid = (y - zs)[50:]
    assert fb.n_calib == 450 and fb.alpha == pytest.approx(0.1)
    assert fb.d_lo == conformal_quantile(-resid, 0.05)
    assert fb.d_hi == conformal_quantile(resid, 0.05)
    assert fb.d_lo > fb.d_hi  # zs is biased high: more room below
    assert ZeroShotFallback.fit(np.full(3, np.nan), np.zeros(3)).d_lo == math.inf


def test_apply_changes_only_new_chemistry_rows_with_a_reference(synth) -> None:
    pred, y, _, _ = synth(6, 1)
    agg = aggregate(pred)
    lo, hi = agg.lo - 0.01, agg.hi + 0.01
    zs = np.array([0.1, 0.2, np.nan, 0.3, 0.4, 0.5])
    jac = np.array([0.0, 0.25, 0.5, 0.6, 0.0, 1.0])
    fb = ZeroShotFallback(alpha=0.1, d_lo=0.05, d_hi=0.07, n_calib=10)
    use = fb.rows(jac, zs)
    np.testing.assert_array_equal(use, [False, True, False, True, False, True])  # NaN: no reference
    est, lo2, hi2 = fb.apply(agg, lo, hi, zs, use)
    np.testing.assert_array_equal(est.q50[use], zs[use])
    np.testing.assert_array_equal(est.q50[~use], agg.q50[~use])
    np.testing.assert_array_equal(lo2[~use], lo[~use])
    np.testing.assert_array_equal(hi2[~use], hi[~use])
    assert np.all(lo2[use] <= np.minimum(lo[use], zs[use] - 0.05))  # the union of both intervals
    assert np.all(hi2[use] >= np.maximum(hi[use], zs[use] + 0.07))
    assert np.all(np.isfinite(lo2) & np.isfinite(hi2))
    np.testing.assert_array_equal(est.p_stable, agg.p_stable)  # no residuals stored: heads' kept
    assert ZeroShotFallback(alpha=0.1, d_lo=0, d_hi=0, n_calib=1, max_jaccard=0.3).rows(jac, zs).sum() == 2


def test_round_trip_and_validation() -> None:
    fb = ZeroShotFallback(alpha=0.1, d_lo=math.inf, d_hi=0.02, n_calib=0, max_jaccard=0.2)
    assert ZeroShotFallback.from_dict(fb.to_dict()) == fb
    with pytest.raises(ValueError, match="alpha"):
        ZeroShotFallback(alpha=1.0, d_lo=0, d_hi=0, n_calib=1)
    with pytest.raises(ValueError, match="max_jaccard"):
        ZeroShotFallback(alpha=0.1, d_lo=0, d_hi=0, n_calib=1, max_jaccard=1.0)


def _new_chemistry(synth, n: int, seed: int, bias: float):
    """Rows of an element set absent from training whose heads are off by ``bias`` eV/atom
    while the backbone's zero-shot value stays as good as on known chemistry."""
    pred, y, clusters, comps = synth(n, seed)
    moved = dataclasses.replace(pred, q10=pred.q10 + bias, q50=pred.q50 + bias, q90=pred.q90 + bias)
    comps = [{"Li": c["Li"], "Co": 0.3, "O": c["O"]} for c in comps]  # no Mn, Fe; Co is new
    return moved, y, clusters, comps


@pytest.mark.parametrize("bias", [0.1, -0.1])
def test_fallback_restores_coverage_and_error_on_a_new_chemical_system(synth, bias: float) -> None:
    train, val = synth(800, 11), synth(1500, 12)
    pred, y, clusters, comps = _new_chemistry(synth, 1000, 13, bias)
    known = synth(1000, 14)
    on = Calibrator.fit(val[0], val[1], val[2], val[3], train[0], train[3])
    off = Calibrator.fit(val[0], val[1], val[2], val[3], train[0], train[3],
                         CalibratorConfig(zero_shot_fallback=False))
    a, b = on.apply(pred, clusters, comps), off.apply(pred, clusters, comps)
    cov = lambda r: np.mean((r["e_hull_lo"] <= y) & (y <= r["e_hull_hi"]))  # noqa: E731
    mae = lambda r: np.mean(np.abs(r["e_hull_pred"] - y))  # noqa: E731
    assert cov(b) < 0.75 and cov(a) >= 0.87  # the heads' interval misses; the union covers
    assert mae(a) < 0.7 * mae(b)
    assert set(a["e_hull_source"]) == {ZERO_SHOT} and set(b["e_hull_source"]) == {ENSEMBLE}
    np.testing.assert_array_equal(a["e_hull_pred"], np.maximum(pred.zero_shot_ehull, 0.0))  # E_hull >= 0
    assert np.all(a["decision"] != "KILL")  # a new element is an OOD composition: never killed
    k_on, k_off = on.apply(*known[:1], known[2], known[3]), off.apply(*known[:1], known[2], known[3])
    for k in ("e_hull_pred", "e_hull_lo", "e_hull_hi", "decision"):  # known chemistry: untouched
        np.testing.assert_array_equal(k_on[k], k_off[k])
    assert on.triage_config == off.triage_config  # val has no new chemistry


def test_fallback_probabilities_come_from_the_zero_shot_residuals(synth) -> None:
    fb = ZeroShotFallback(alpha=0.1, d_lo=0.05, d_hi=0.05, n_calib=4, residuals=(-0.02, 0.0, 0.01, 0.04))
    np.testing.assert_allclose(fb.probability_below(np.array([0.0, 0.045, 0.065, 0.2]), 0.05),
                               [1.0, 0.5, 0.25, 0.0])  # share of r with zs + r < 0.05
    pred, _, _, _ = synth(4, 2)
    agg = aggregate(pred)
    zs = np.array([0.0, 0.045, 0.065, 0.2])
    use = np.array([True, True, True, False])
    est, _, _ = fb.apply(agg, agg.lo, agg.hi, zs, use)
    np.testing.assert_allclose(est.p_stable[:3], [1.0, 0.5, 0.25])
    np.testing.assert_allclose(est.p_metastable[:3], fb.probability_below(zs[:3], 0.10))
    assert est.p_stable[3] == agg.p_stable[3] and est.p_metastable[3] == agg.p_metastable[3]
    fitted = ZeroShotFallback.fit(np.array([0.1, np.nan, 0.2, 0.0]), np.array([0.12, 0.0, 0.15, 0.01]))
    assert fitted.residuals == pytest.approx((-0.05, 0.01, 0.02))  # sorted, NaN row dropped
    assert ZeroShotFallback.from_dict(fitted.to_dict()) == fitted
