import math

import numpy as np
import pytest

from cathode_ray.calibrate.aggregate import Aggregated, aggregate
from cathode_ray.calibrate.conformal import fit_conformal
from cathode_ray.calibrate.metrics import decision_metrics
from cathode_ray.calibrate.ood import OODResult
from cathode_ray.calibrate.triage import TriageConfig, choose_thresholds, triage


def _agg(q50: list[float], p: list[float]) -> Aggregated:
    a = np.asarray(q50, dtype=float)
    return Aggregated(q50=a, lo=a - 0.05, hi=a + 0.05, epistemic_std=np.zeros_like(a),
                      aleatoric_width=np.full_like(a, 0.1), p_stable=np.asarray(p, dtype=float),
                      p_metastable=np.asarray(p, dtype=float))


def _ood(flags: list[bool], gates: list[str]) -> OODResult:
    base = OODResult.in_domain(len(flags))
    return OODResult(**{**base.__dict__, "is_ood": np.array(flags),
                        "ood_gates": np.array(gates, dtype=object)})


CFG = TriageConfig(kill_lo=0.10, keep_hi=0.05, keep_q50=0.02, p_keep=0.8)


def test_rules_and_reasons() -> None:
    agg = _agg([0.00, 0.01, 0.08, 0.30, 0.30], [0.9, 0.9, 0.4, 0.0, 0.0])
    lo = np.array([-0.03, -0.05, 0.02, 0.20, 0.20])
    hi = np.array([0.031, 0.09, 0.15, 0.40, 0.40])
    ood = _ood([False, False, False, False, True], ["", "", "", "", "composition"])
    dec, why = triage(agg, lo, hi, ood, CFG)
    assert list(dec) == ["KEEP", "KEEP", "MAYBE", "KILL", "MAYBE"]
    assert why[0] == "hi 0.031 < 0.050: likely stable"
    assert why[1].startswith("q50 0.010 < 0.020 and p_stable 0.90 >= 0.80")
    assert why[3] == "lo 0.200 > 0.100: likely unstable"
    assert why[4] == "OOD (gates: composition): would be KILL"
    assert all(isinstance(r, str) and r for r in why)


def test_ood_row_is_never_killed_even_by_score_only() -> None:
    n = 50
    agg = _agg([1.0] * n, [0.0] * n)
    base = OODResult.in_domain(n)
    score = np.linspace(0, 1, n)
    ood = OODResult(**{**base.__dict__, "ood_score": score})
    dec, why = triage(agg, np.full(n, 0.9), np.full(n, 1.1), ood, CFG)
    assert not np.any((dec == "KILL") & (score >= CFG.ood_threshold))
    assert np.all(dec[score < CFG.ood_threshold] == "KILL")
    assert why[-1] == "OOD (gates: score 1.00): would be KILL"


def test_ood_keep_blocking_is_configurable() -> None:
    agg = _agg([0.0], [1.0])
    ood = _ood([True], ["embedding"])
    lo, hi = np.array([-0.1]), np.array([0.01])
    assert triage(agg, lo, hi, ood, CFG)[0][0] == "MAYBE"
    cfg = TriageConfig(ood_blocks_keep=False)
    dec, why = triage(agg, lo, hi, ood, cfg)
    assert dec[0] == "KEEP" and "[OOD: embedding]" in why[0]


def test_config_validation_and_json_round_trip() -> None:
    with pytest.raises(ValueError):
        TriageConfig(kill_lo=0.01)
    with pytest.raises(ValueError):
        TriageConfig(keep_hi=0.2)
    cfg = TriageConfig(keep_hi=-math.inf, p_keep=0.9)
    assert TriageConfig.from_dict(cfg.to_dict()) == cfg


def test_choose_thresholds_meets_targets_on_val(synth) -> None:
    pred, y, clusters, _ = synth(4000, 11)
    agg = aggregate(pred)
    lo, hi = fit_conformal(agg.lo, agg.hi, y, clusters).apply(agg.lo, agg.hi, clusters)
    cfg, text = choose_thresholds(agg, lo, hi, y)
    dec, _ = triage(agg, lo, hi, OODResult.in_domain(len(y)), cfg)
    m = decision_metrics(y, dec)
    assert m["false_kill_rate"] == 0.0
    assert m["keep_precision"] >= 0.93 and m["frac_keep"] > 0 and m["frac_kill"] > 0
    assert "kill_lo" in text and "KEEP" in text


def test_choose_thresholds_ignores_a_nan_lower_bound(synth) -> None:
    pred, y, clusters, _ = synth(2000, 3)
    agg = aggregate(pred)
    lo, hi = fit_conformal(agg.lo, agg.hi, y, clusters).apply(agg.lo, agg.hi, clusters)
    ref, _ = choose_thresholds(agg, lo, hi, y)
    i = int(np.flatnonzero(y < 0.05)[0])  # a truly stable row with no lower bound
    lo = lo.copy()
    lo[i] = np.nan
    cfg, text = choose_thresholds(agg, lo, hi, y)
    assert math.isfinite(cfg.kill_lo) and cfg.kill_lo <= ref.kill_lo
    dec, _ = triage(agg, lo, hi, OODResult.in_domain(len(y)), cfg)
    assert dec[i] != "KILL" and decision_metrics(y, dec)["false_kill_rate"] == 0.0


def test_choose_thresholds_disables_keep_when_unreachable() -> None:
    agg = _agg([0.0, 0.0, 0.0, 0.3], [0.9, 0.9, 0.9, 0.1])
    y = np.array([0.2, 0.2, 0.01, 0.3])  # predicted-stable rows are mostly unstable
    cfg, text = choose_thresholds(agg, agg.lo, agg.hi, y)
    assert cfg.keep_hi == -math.inf and cfg.keep_q50 == -math.inf
    assert "KEEP disabled" in text


def test_wilson_bound_is_stricter_on_small_samples() -> None:
    from cathode_ray.calibrate.triage import wilson_lower

    # 9/10 and 90/100 have the same ratio; the bound is lower for the smaller sample
    small, large = wilson_lower(np.array([9, 90]), np.array([10, 100]), 1.2816)
    assert small < large < 0.9
    assert wilson_lower(np.array([9]), np.array([10]), 0.0)[0] == pytest.approx(0.9)
