import dataclasses
import json
import math

import numpy as np
import pytest
from matplotlib.image import imread

from cathode_ray.report.governance import (
    COVERAGE_LEVELS,
    SplitData,
    render_markdown,
    report_from_predictions,
    write_report,
)

CHECK_NAMES = ["spearman_val", "spearman_test", "coverage_test", "false_kill_rate_test",
               "keep_precision_test", "makes_decisions_test"]


@pytest.fixture(scope="module")
def report(fitted_report_inputs) -> dict:
    splits, cal = fitted_report_inputs
    rng = np.random.default_rng(0)
    base = {s: d.y + 0.1 * rng.standard_normal(len(d.y)) for s, d in splits.items()}
    return report_from_predictions(splits, cal, baselines={"noisy_oracle": base})


def test_six_checks_with_values_and_pass(report) -> None:
    assert [c["name"] for c in report["checks"]] == CHECK_NAMES
    for c in report["checks"]:
        assert {"value", "threshold", "pass"} <= set(c)
    by_name = {c["name"]: c for c in report["checks"]}
    assert by_name["coverage_test"]["threshold"] == 0.90
    assert by_name["false_kill_rate_test"]["threshold"] == 0.02
    # a well-specified synthetic model passes everything
    assert report["passed"], [c for c in report["checks"] if not c["pass"]]


def test_sections_present(report) -> None:
    assert set(report["metrics"]) == {"val", "test", "loco"}
    assert set(report["conformal_comparison"]) == {"test", "loco"}
    for per in report["conformal_comparison"].values():
        assert set(per) == {"symmetric", "asymmetric"}
    assert report["coverage_curve"]["levels"] == list(COVERAGE_LEVELS)
    curve = np.array(report["coverage_curve"]["test"])
    assert np.all(np.diff(curve) >= -0.02) and abs(curve[-1] - 0.95) < 0.03
    zs = report["baselines"]["zero_shot_backbone"]["test"]
    assert 1000 < zs["n"] < 1500  # NaN zero-shot rows dropped
    assert set(report["baselines"]) == {"ensemble_q50", "zero_shot_backbone", "noisy_oracle"}
    assert "kill_lo" in report["triage"]["reasoning"]
    assert sum(report["decision_counts"]["test"].values()) == 1500


def test_bad_model_fails_spearman(split_factory, fitted_report_inputs) -> None:
    splits, cal = fitted_report_inputs
    bad = split_factory(600, 40)
    shuffled = SplitData(y=np.random.default_rng(1).permutation(bad.y), pred=bad.pred,
                         clusters=bad.clusters, compositions=bad.compositions)
    rep = report_from_predictions({"val": splits["val"], "test": shuffled}, cal)
    by_name = {c["name"]: c for c in rep["checks"]}
    assert not by_name["spearman_test"]["pass"] and not rep["passed"]
    assert by_name["spearman_val"]["pass"]


def test_write_report_files(report, tmp_path) -> None:
    paths = write_report(report, tmp_path)
    names = {p.name for p in paths}
    assert {"governance.json", "report.md", "parity_test.png", "coverage_vs_nominal.png",
            "coverage_per_cluster.png", "decision_counts.png"} <= names
    data = json.loads((tmp_path / "governance.json").read_text())
    assert len(data["checks"]) == 6 and "plot_data" not in data
    assert data["checks"][0]["value"] == pytest.approx(report["checks"][0]["value"])
    for p in paths:
        if p.suffix == ".png":
            img = imread(p)
            assert img.ndim == 3 and img.shape[0] > 100
    md = (tmp_path / "report.md").read_text()
    assert "## Seed-card checks" in md and "symmetric" in md and "zero_shot_backbone" in md


def test_missing_test_split_fails_checks_not_crash(fitted_report_inputs) -> None:
    splits, cal = fitted_report_inputs
    rep = report_from_predictions({"val": splits["val"]}, cal)
    by_name = {c["name"]: c for c in rep["checks"]}
    assert math.isnan(by_name["coverage_test"]["value"]) and not rep["passed"]
    with pytest.raises(ValueError):
        report_from_predictions({"test": splits["test"]}, cal)


def test_frac_ood_counts_score_only_rows_as_triage_does(fitted_report_inputs) -> None:
    from dataclasses import replace

    from cathode_ray.calibrate.calibrator import Calibrator

    splits, cal = fitted_report_inputs
    # ood_threshold 0: every row counts as OOD for triage, with or without a fired gate
    strict = Calibrator(conformal=cal.conformal, method=cal.method, ood=cal.ood,
                        triage_config=replace(cal.triage_config, ood_threshold=0.0),
                        triage_reasoning=cal.triage_reasoning)
    rep = report_from_predictions({"val": splits["val"], "test": splits["test"]}, strict)
    assert rep["ood"]["test"]["frac_ood"] == 1.0
    assert rep["decision_counts"]["test"]["KILL"] == 0  # OOD rows are never killed


def test_new_chemistry_split_is_reported_with_the_zero_shot_fallback(split_factory, fitted_report_inputs) -> None:
    splits, cal = fitted_report_inputs
    new = split_factory(600, 41)
    p = new.pred
    biased = dataclasses.replace(p, q10=p.q10 + 0.1, q50=p.q50 + 0.1, q90=p.q90 + 0.1)
    comps = [{"Li": 1.0, "Co": 1.0, "O": 2.0}] * 600  # an element set absent from training
    loco = SplitData(y=new.y, pred=biased, clusters=new.clusters, compositions=comps)
    rep = report_from_predictions({"val": splits["val"], "test": splits["test"], "loco": loco}, cal)
    has_zs = np.isfinite(p.zero_shot_ehull)
    assert rep["ood"]["loco"]["zero_shot_fallback"] == int(has_zs.sum())
    assert rep["ood"]["test"]["zero_shot_fallback"] == 0
    est = np.maximum(np.where(has_zs, p.zero_shot_ehull, biased.q50.mean(axis=0)), 0.0)  # E_hull >= 0
    assert rep["metrics"]["loco"]["mae"] == pytest.approx(np.mean(np.abs(est - new.y)))
    assert rep["baselines"]["ensemble_q50"]["loco"]["mae"] > rep["metrics"]["loco"]["mae"]
    level = rep["coverage_curve"]["levels"].index(0.9)
    assert rep["coverage_curve"]["loco"][level] == pytest.approx(rep["metrics"]["loco"]["coverage"])
    assert rep["conformal_comparison"]["loco"][rep["conformal_method"]]["coverage"] == \
        pytest.approx(rep["metrics"]["loco"]["coverage"])
    assert "zero-shot fallback" in render_markdown(rep)


def test_coverage_curve_at_the_target_level_is_the_reported_coverage(split_factory) -> None:
    """The curve refits on val at each level; at the calibrator's own level it must measure the
    bounds the metrics table measures: clipped at 0, where a stable structure's E_hull is."""
    from cathode_ray.calibrate.calibrator import Calibrator

    def on_hull(split: SplitData) -> SplitData:  # members that put structures below the hull
        below = split.y < 0.02
        shift = np.where(below, -0.03, 0.0)[None, :]
        y = np.where(below, 0.0, split.y)
        p = dataclasses.replace(split.pred, q10=split.pred.q10 + shift, q50=split.pred.q50 + shift,
                                q90=split.pred.q90 + shift)
        return dataclasses.replace(split, y=y, pred=p)

    train, val, test = split_factory(400, 51), on_hull(split_factory(1500, 52)), on_hull(split_factory(1500, 53))
    cal = Calibrator.fit(val.pred, val.y, val.clusters, val.compositions, train.pred, train.compositions)
    rep = report_from_predictions({"val": val, "test": test}, cal)
    at_target = rep["coverage_curve"]["test"][COVERAGE_LEVELS.index(rep["target_coverage"])]
    assert at_target == pytest.approx(rep["metrics"]["test"]["coverage"], abs=1e-12)


def test_checks_judge_the_evaluation_split(fitted_report_inputs, split_factory) -> None:
    splits, cal = fitted_report_inputs
    bad = split_factory(600, 41)
    shuffled = SplitData(y=np.random.default_rng(2).permutation(bad.y), pred=bad.pred,
                         clusters=bad.clusters, compositions=bad.compositions)
    # --split all: one evaluation set named "all", and no test split at all
    rep = report_from_predictions({"val": splits["val"], "all": shuffled}, cal, evaluation="all")
    names = [c["name"] for c in rep["checks"]]
    assert names == ["spearman_val", *(n.replace("_test", "_all") for n in CHECK_NAMES[1:])]
    by_name = {c["name"]: c for c in rep["checks"]}
    assert by_name["spearman_all"]["value"] == rep["metrics"]["all"]["spearman"]
    assert not by_name["spearman_all"]["pass"] and by_name["spearman_val"]["pass"]
    assert rep["evaluation_split"] == "all" and "Checks judge the `all` split" in render_markdown(rep)
    loco = report_from_predictions(splits, cal, evaluation="loco")
    assert {c["split"] for c in loco["checks"]} == {"val", "loco"}
    assert {c["name"]: c for c in loco["checks"]}["coverage_loco"]["value"] == loco["metrics"]["loco"]["coverage"]
    assert "in-sample" in render_markdown(report_from_predictions(splits, cal, evaluation="val"))


def test_every_coverage_figure_leaves_out_the_rows_the_metrics_leave_out(fitted_report_inputs) -> None:
    """NaN predictions on 5 % of test rows: before, the metrics said 0.916 while the comparison,
    the curve and the per-cluster figures counted those rows as misses (0.870)."""
    splits, cal = fitted_report_inputs
    test = splits["test"]
    nan_rows = np.arange(len(test.y)) % 20 == 0
    q = {k: np.where(nan_rows[None, :], np.nan, getattr(test.pred, k)) for k in ("q10", "q50", "q90")}
    broken = dataclasses.replace(test, pred=dataclasses.replace(test.pred, **q))
    rep = report_from_predictions({"val": splits["val"], "test": broken}, cal)
    m = rep["metrics"]["test"]
    assert m["n_nonfinite"] == nan_rows.sum()
    assert rep["conformal_comparison"]["test"][rep["conformal_method"]]["coverage"] == m["coverage"]
    at_target = rep["coverage_curve"]["test"][COVERAGE_LEVELS.index(rep["target_coverage"])]
    assert at_target == pytest.approx(m["coverage"], abs=1e-12)
    per_cluster = rep["cluster_coverage"]["test"].values()
    assert sum(c["n"] for c in per_cluster) == m["n"]
    assert sum(c["n"] * c["coverage"] for c in per_cluster) == pytest.approx(m["n"] * m["coverage"])


def test_no_coverage_curve_when_val_did_not_calibrate_the_model(fitted_report_inputs, tmp_path) -> None:
    """A dataset from another snapshot: a curve refitted on its val would describe another model."""
    splits, cal = fitted_report_inputs
    rep = report_from_predictions(splits, cal, val_calibrated=False)
    assert rep["coverage_curve"] is None and "did not calibrate" in rep["coverage_curve_note"]
    paths = {p.name for p in write_report(rep, tmp_path)}
    assert "coverage_vs_nominal.png" not in paths and "coverage_per_cluster.png" in paths
    assert "Coverage curve: no coverage curve" in (tmp_path / "report.md").read_text()
    assert report_from_predictions(splits, cal)["coverage_curve_note"] is None
