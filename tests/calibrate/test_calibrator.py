import dataclasses
import json
import time

import numpy as np
import pytest

from cathode_ray.calibrate.aggregate import aggregate
from cathode_ray.calibrate.calibrator import (
    RESULT_COLUMNS,
    Calibrator,
    CalibratorConfig,
)
from cathode_ray.calibrate.triage import TriageConfig


@pytest.fixture(scope="module")
def fitted(synth) -> tuple[Calibrator, tuple]:
    make_synthetic = synth
    train = make_synthetic(1000, 21)
    val = make_synthetic(2000, 22)
    test = make_synthetic(1000, 23)
    cal = Calibrator.fit(val[0], val[1], val[2], val[3], train[0], train[3])
    return cal, test


def test_apply_returns_exact_columns(fitted) -> None:
    cal, (pred, y, clusters, comps) = fitted
    out = cal.apply(pred, clusters, comps)
    assert tuple(out) == RESULT_COLUMNS
    assert all(len(v) == len(y) for v in out.values())
    assert set(out["decision"]) <= {"KEEP", "MAYBE", "KILL"}
    assert np.all(out["e_hull_lo"] <= out["e_hull_pred"])
    assert np.all(np.maximum(out["q10"], 0.0) >= out["e_hull_lo"]) or cal.params.d_lo < 0
    cov = np.mean((out["e_hull_lo"] <= y) & (y <= out["e_hull_hi"]))
    assert 0.86 <= cov <= 0.94
    assert all(isinstance(r, str) and r for r in out["decision_reason"])


def test_ood_rows_are_not_killed(fitted) -> None:
    cal, (pred, y, clusters, comps) = fitted
    comps = [{**c, "Ti": 0.3} if i % 2 else c for i, c in enumerate(comps)]
    out = cal.apply(pred, clusters, comps)
    odd = np.arange(len(y)) % 2 == 1
    assert np.all(out["decision"][odd] != "KILL")
    assert np.all(["composition" in g for g in out["ood_gates"][odd]])
    assert np.any(out["decision"][~odd] == "KILL")


def test_save_load_round_trip_exact(fitted, tmp_path) -> None:
    cal, (pred, _, clusters, comps) = fitted
    paths = cal.save(tmp_path)
    assert {p.name for p in paths} == {"conformal_params.json", "triage.json",
                                       "ood_params.json", "ood_train.npz"}
    for p in paths:
        assert p.exists()
        if p.suffix == ".json":
            json.loads(p.read_text())
    loaded = Calibrator.load(tmp_path)
    comps = [{**c, "Co": 0.1} if i % 3 else c for i, c in enumerate(comps)]  # some fall back
    a, b = cal.apply(pred, clusters, comps), loaded.apply(pred, clusters, comps)
    assert (a["e_hull_source"] == "zero_shot").any()
    for k in RESULT_COLUMNS:
        np.testing.assert_array_equal(a[k], b[k])
    assert loaded.conformal == cal.conformal and loaded.triage_config == cal.triage_config
    assert loaded.fallback == cal.fallback is not None


def test_model_calibrated_before_the_fallback_loads_without_it(fitted, tmp_path) -> None:
    cal, (pred, _, clusters, comps) = fitted
    cal.save(tmp_path)
    conf = json.loads((tmp_path / "conformal_params.json").read_text())
    del conf["zero_shot_fallback"]
    (tmp_path / "conformal_params.json").write_text(json.dumps(conf))
    old = Calibrator.load(tmp_path)
    assert old.fallback is None
    out = old.apply(pred, clusters, [{**c, "Co": 0.1} for c in comps])
    assert set(out["e_hull_source"]) == {"ensemble"}


def test_method_choice_and_fixed_triage(synth) -> None:
    train, val = synth(300, 1), synth(600, 2)
    cfg = CalibratorConfig(method="symmetric", triage=TriageConfig())
    cal = Calibrator.fit(val[0], val[1], None, val[3], train[0], train[3], cfg)
    assert cal.method == "symmetric" and cal.triage_config == TriageConfig()
    assert set(cal.conformal) == {"symmetric", "asymmetric"}
    assert cal.params.d_lo == cal.params.d_hi
    with pytest.raises(ValueError):
        CalibratorConfig(method="bogus")


def test_apply_is_cheap_per_batch(fitted) -> None:
    cal, (pred, _, clusters, comps) = fitted
    cal.apply(pred, clusters, comps)
    t0 = time.perf_counter()
    cal.apply(pred, clusters, comps)
    assert time.perf_counter() - t0 < 1.0  # 1000 rows


def test_estimates_and_bounds_are_clipped_at_zero(fitted) -> None:
    """E_hull >= 0: a negative raw estimate becomes 0, bounds too; raw quantiles keep the sign.
    Clipping never moves an estimate away from a label and never uncovers one."""
    cal, (pred, y, clusters, comps) = fitted
    low = dataclasses.replace(pred, q10=pred.q10 - 0.05, q50=pred.q50 - 0.05, q90=pred.q90 - 0.05)
    out = cal.apply(low, clusters, comps)
    raw = aggregate(low)
    raw_lo, raw_hi = cal.calibrated(raw, clusters)
    assert (raw.q50 < 0).sum() > 50 and (out["q10"] < 0).sum() > 50
    np.testing.assert_array_equal(out["e_hull_pred"], np.maximum(raw.q50, 0.0))
    np.testing.assert_array_equal(out["e_hull_lo"], np.maximum(raw_lo, 0.0))
    np.testing.assert_array_equal(out["e_hull_hi"], np.maximum(raw_hi, 0.0))
    assert np.all(np.abs(out["e_hull_pred"] - y) <= np.abs(raw.q50 - y))
    covered_raw = (raw_lo <= y) & (y <= raw_hi)
    assert np.all((out["e_hull_lo"] <= y) & (y <= out["e_hull_hi"]) | ~covered_raw)
