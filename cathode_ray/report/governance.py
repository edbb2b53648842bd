"""Governance report: seed-card checks, metrics per split, conformal comparison, baselines.

``report_from_predictions`` is pure (arrays in, dict out); ``write_report`` writes
governance.json, report.md and PNG plots. Energies in eV/atom. The dict's ``plot_data`` entry
holds the arrays behind the plots and is not written to governance.json.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cathode_ray import seedcard
from cathode_ray.calibrate.aggregate import aggregate
from cathode_ray.calibrate.calibrator import Calibrator, Estimate, clip_at_zero
from cathode_ray.calibrate.conformal import METHODS, fit_conformal
from cathode_ray.calibrate.fallback import ZERO_SHOT, ZeroShotFallback
from cathode_ray.calibrate.metrics import (
    all_metrics,
    coverage,
    median_width,
    point_metrics,
    scored_rows,
)
from cathode_ray.calibrate.ood import GATE_NAMES
from cathode_ray.calibrate.triage import DECISIONS
from cathode_ray.model.prediction import EnsemblePrediction
from cathode_ray.report import plots

COVERAGE_LEVELS: tuple[float, ...] = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))
GOVERNANCE_FILE = "governance.json"
REPORT_FILE = "report.md"
_MD_METRICS: tuple[str, ...] = (
    "n", "spearman", "mae", "coverage", "median_width", "ef10", "frac_stable_top100", "f1",
    "daf", "keep_precision", "keep_recall", "kill_precision", "false_kill_rate", "frac_keep",
    "frac_kill",
)


@dataclass(frozen=True, kw_only=True)
class SplitData:
    """One labelled split: y [N] true E_hull (eV/atom), ensemble prediction, SOAP clusters [N]
    (or None) and compositions (element symbol -> amount, len N)."""

    y: np.ndarray
    pred: EnsemblePrediction
    clusters: np.ndarray | None
    compositions: Sequence[Mapping[str, float]]

    def __post_init__(self) -> None:
        n = len(self.pred)
        if self.y.shape != (n,) or len(self.compositions) != n:
            raise ValueError(f"y / compositions must have {n} rows")
        if self.clusters is not None and self.clusters.shape != (n,):
            raise ValueError(f"clusters must have shape {(n,)}")


# name, split ("eval": the evaluation split, "test" unless told), metric, operator, threshold
_CHECKS: tuple[tuple[str, str, str, str, float], ...] = (
    ("spearman", "val", "spearman", ">", 0.5),
    ("spearman", "eval", "spearman", ">", 0.5),
    ("coverage", "eval", "coverage", ">=", seedcard.TARGET_COVERAGE),
    ("false_kill_rate", "eval", "false_kill_rate", "<", 0.02),
    ("keep_precision", "eval", "keep_precision", ">", 0.85),
    ("makes_decisions", "eval", "min_frac_keep_kill", ">", 0.0),
)
_OPS: dict[str, Callable[[float, float], bool]] = {
    ">": lambda a, b: a > b, ">=": lambda a, b: a >= b, "<": lambda a, b: a < b,
}


def _checks(metrics: Mapping[str, Mapping[str, float]], evaluation: str = "test") -> list[dict[str, Any]]:
    """The six seed-card checks, five of them on the ``evaluation`` split; a missing split or
    NaN value fails. Names are ``{check}_{split}`` (``coverage_test``)."""
    out = []
    for check, where, metric, op, threshold in _CHECKS:
        split = evaluation if where == "eval" else where
        name = f"{check}_{split}"
        m = metrics.get(split, {})
        if metric == "min_frac_keep_kill":
            value = min(m.get("frac_keep", math.nan), m.get("frac_kill", math.nan))
        else:
            value = m.get(metric, math.nan)
        ok = not math.isnan(value) and _OPS[op](value, threshold)
        out.append({"name": name, "split": split, "metric": metric, "value": value, "op": op,
                    "threshold": threshold, "pass": bool(ok)})
    return out


def _coverage(y: np.ndarray, q50: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> float:
    ok = scored_rows(y, q50, lo, hi)
    return coverage(np.asarray(y)[ok], np.asarray(lo)[ok], np.asarray(hi)[ok])


def _coverage_curve(splits: Mapping[str, SplitData], calibrator: Calibrator,
                    aggs: Mapping[str, Any], ests: Mapping[str, Estimate]) -> dict[str, list[float]]:
    """Refit conformal (and the zero-shot fallback's interval) on val at each nominal level;
    measured coverage on the other splits."""
    val = splits["val"]
    method, min_points = calibrator.method, calibrator.params.min_points
    curve: dict[str, list[float]] = {"levels": list(COVERAGE_LEVELS)}
    for name in (s for s in splits if s != "val"):
        d = splits[name]
        use = ests[name].fallback  # [N] bool
        curve[name] = []
        for level in COVERAGE_LEVELS:
            params = fit_conformal(aggs["val"].lo, aggs["val"].hi, val.y, val.clusters,
                                   method=method, coverage=level, min_points=min_points)
            lo, hi = params.apply(aggs[name].lo, aggs[name].hi, d.clusters)
            if calibrator.fallback is not None:
                fb = ZeroShotFallback.fit(val.pred.zero_shot_ehull, val.y, coverage=level,
                                          max_jaccard=calibrator.fallback.max_jaccard)
                _, lo, hi = fb.apply(aggs[name], lo, hi, d.pred.zero_shot_ehull, use)
            lo, hi = clip_at_zero(lo, hi)  # as the estimate's bounds
            curve[name].append(_coverage(d.y, ests[name].agg.q50, lo, hi))
    return curve


def _cluster_coverage(y: np.ndarray, q50: np.ndarray, clusters: np.ndarray | None,
                      lo: np.ndarray, hi: np.ndarray) -> dict[str, dict[str, float]]:
    """Coverage per SOAP cluster over the rows :func:`scored_rows` keeps (``n``: those rows)."""
    if clusters is None:
        return {}
    ok = scored_rows(y, q50, lo, hi)
    out = {}
    for c in np.unique(clusters).tolist():
        rows = ok & (clusters == c)
        out[str(c)] = {"n": float(rows.sum()), "coverage": coverage(y[rows], lo[rows], hi[rows])}
    return out


def _baselines(splits: Mapping[str, SplitData],
               extra: Mapping[str, Mapping[str, np.ndarray]] | None,
               aggs: Mapping[str, Any]) -> dict[str, dict[str, dict[str, float]]]:
    rows: dict[str, dict[str, dict[str, float]]] = {
        "ensemble_q50": {s: point_metrics(d.y, aggs[s].q50) for s, d in splits.items()},
        "zero_shot_backbone": {s: point_metrics(d.y, d.pred.zero_shot_ehull)
                               for s, d in splits.items()},
    }
    for name, per_split in (extra or {}).items():
        rows[name] = {s: point_metrics(splits[s].y, p) for s, p in per_split.items() if s in splits}
    return rows


def report_from_predictions(splits: dict[str, SplitData], calibrator: Calibrator, *,
                            baselines: dict[str, dict[str, np.ndarray]] | None = None,
                            evaluation: str = "test",
                            val_calibrated: bool = True) -> dict[str, Any]:
    """Build the governance report for labelled splits: "val" (the calibration split, for the
    coverage curve's refits) and the ``evaluation`` split the checks judge ("test" unless told,
    e.g. "loco" or "all"; absent, its checks fail); others optional. ``baselines``: name -> split -> point predictions [N]
    (eV/atom). ``val_calibrated=False``: "val" is not the rows the model was calibrated on (a
    dataset from another snapshot), so no coverage curve is drawn: refitted on those rows it
    would describe another, recalibrated model (``coverage_curve`` is None, with a note)."""
    if "val" not in splits:
        raise ValueError("splits must include 'val' (the calibration split)")
    aggs = {s: aggregate(d.pred) for s, d in splits.items()}  # the ensemble alone
    ests = {s: calibrator.estimate(d.pred, d.clusters, d.compositions) for s, d in splits.items()}
    results = {s: calibrator.columns(e) for s, e in ests.items()}
    metrics, counts, ood, clusters_cov, comparison = {}, {}, {}, {}, {}
    for s, d in splits.items():
        r = results[s]
        metrics[s] = all_metrics(d.y, ests[s].agg, r["e_hull_lo"], r["e_hull_hi"], r["decision"])
        counts[s] = {k: int((r["decision"] == k).sum()) for k in DECISIONS}
        gates = r["ood_gates"]
        # as triage counts them: a fired gate, or a score over either threshold
        cut = min(calibrator.ood.config.score_threshold, calibrator.triage_config.ood_threshold)
        is_ood = (gates != "") | (r["ood_score"] >= cut)
        ood[s] = {"frac_ood": float(np.mean(is_ood)) if len(gates) else math.nan,
                  **{g: int(sum(g in x.split(",") for x in gates)) for g in GATE_NAMES},
                  "zero_shot_fallback": int((r["e_hull_source"] == ZERO_SHOT).sum())}
        clusters_cov[s] = _cluster_coverage(d.y, ests[s].agg.q50, d.clusters, r["e_hull_lo"],
                                            r["e_hull_hi"])
        if s != "val":
            comparison[s] = {}
            for m in METHODS:
                e = ests[s] if m == calibrator.method else calibrator.estimate(
                    d.pred, d.clusters, d.compositions, m)
                lo, hi = e.lo, e.hi
                ok = scored_rows(d.y, e.agg.q50, lo, hi)
                comparison[s][m] = {"coverage": coverage(d.y[ok], lo[ok], hi[ok]),
                                    "median_width": median_width(lo[ok], hi[ok])}
    params = calibrator.params
    checks = _checks(metrics, evaluation)
    return {
        "schema_version": 1,
        "evaluation_split": evaluation,
        "target_coverage": params.coverage,
        "conformal_method": calibrator.method,
        "checks": checks,
        "passed": all(c["pass"] for c in checks),
        "metrics": metrics,
        "decision_counts": counts,
        "ood": ood,
        "conformal_comparison": comparison,
        "coverage_curve": _coverage_curve(splits, calibrator, aggs, ests) if val_calibrated else None,
        "coverage_curve_note": None if val_calibrated else (
            "no coverage curve: this dataset's val rows did not calibrate the model, and a curve "
            "refitted on them would describe another model; coverage at the model's own level "
            "is in the metrics"),
        "cluster_coverage": clusters_cov,
        "baselines": _baselines(splits, baselines, aggs),
        "triage": {"config": calibrator.triage_config.to_dict(),
                   "reasoning": calibrator.triage_reasoning},
        "conformal_params": {m: p.to_dict() for m, p in calibrator.conformal.items()},
        "plot_data": {s: {"y": d.y, "q50": ests[s].agg.q50, "lo": results[s]["e_hull_lo"],
                          "hi": results[s]["e_hull_hi"]} for s, d in splits.items()},
    }


#: Metrics of the ensemble-mode comparison table (per split).
MODE_METRICS: tuple[str, ...] = ("spearman", "mae", "coverage", "median_width", "keep_precision",
                                 "false_kill_rate", "frac_keep", "frac_kill")


def mode_summary(report: Mapping[str, Any], *, mode: str, n_members: int,
                 members_ms_per_structure: float, model_id: str) -> dict[str, Any]:
    """One row of the ensemble-mode comparison: what a mode costs and what it delivers.

    Args:
        report: a report of this model (``report_from_predictions``).
        mode: ``head-only`` (members differ only in their heads) or ``last-block``.
        members_ms_per_structure: measured time of the members' part (last block(s) + heads) per
            structure, ms; the frozen trunk is shared by both modes and excluded.
    """
    return {"model_id": model_id, "mode": mode, "members": n_members,
            "members_ms_per_structure": members_ms_per_structure, "passed": report["passed"],
            "metrics": {s: {k: m.get(k) for k in MODE_METRICS} for s, m in report["metrics"].items()}}


def _jsonable(obj: Any) -> Any:
    """Strict-JSON view: numpy -> python, non-finite floats -> None, keys -> str."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, bool | np.bool_):
        return bool(obj)
    if isinstance(obj, int | np.integer):
        return int(obj)
    if isinstance(obj, float | np.floating):
        return float(obj) if math.isfinite(obj) else None
    return obj


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.0f}" if value.is_integer() and abs(value) >= 10 else f"{value:.3f}"
    return str(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]


def render_markdown(report: Mapping[str, Any], images: Sequence[str] = ()) -> str:
    """Human-readable report.md text."""
    md = ["# cathode_ray governance report", "",
          f"Overall: **{'PASS' if report['passed'] else 'FAIL'}** "
          f"(conformal method {report['conformal_method']}, target coverage "
          f"{report['target_coverage']:.2f}; energies in eV/atom)", "",
          f"Checks judge the `{report.get('evaluation_split', 'test')}` split"
          + (" (the calibration split: its coverage is in-sample)"
             if report.get("evaluation_split") == "val" else "") + ".", "", "## Seed-card checks", ""]
    md += _table(["check", "value", "rule", "pass"],
                 [[c["name"], c["value"], f"{c['op']} {c['threshold']}",
                   "yes" if c["pass"] else "NO"] for c in report["checks"]])
    md += ["", "## Metrics per split", ""]
    md += _table(["split", *_MD_METRICS],
                 [[s, *(m.get(k) for k in _MD_METRICS)] for s, m in report["metrics"].items()])
    md += ["", "## Conformal: symmetric vs asymmetric", ""]
    md += _table(["split", "method", "coverage", "median width"],
                 [[s, m, v["coverage"], v["median_width"]]
                  for s, per in report["conformal_comparison"].items() for m, v in per.items()])
    if report.get("coverage_curve_note"):
        md += ["", f"Coverage curve: {report['coverage_curve_note']}."]
    md += ["", "## Baselines (point predictors)", ""]
    md += _table(["baseline", "split", "n", "spearman", "mae", "f1", "daf"],
                 [[b, s, m["n"], m["spearman"], m["mae"], m["f1"], m["daf"]]
                  for b, per in report["baselines"].items() for s, m in per.items()])
    md += ["", "## Decisions and OOD", ""]
    md += _table(["split", *DECISIONS, "frac OOD", *GATE_NAMES, "zero-shot fallback"],
                 [[s, *(c[k] for k in DECISIONS), report["ood"][s]["frac_ood"],
                   *(report["ood"][s][g] for g in GATE_NAMES), report["ood"][s].get("zero_shot_fallback")]
                  for s, c in report["decision_counts"].items()])
    md += ["", "## Triage thresholds", "", "```", json.dumps(report["triage"]["config"]), "```",
           "", report["triage"]["reasoning"], ""]
    if report.get("ensemble_modes"):
        modes = report["ensemble_modes"]
        md += ["## Ensemble modes: cost vs accuracy and calibration", "",
               "Members' part only (last block(s) + heads, ms per structure on the report machine); "
               "the frozen trunk runs once per structure in every mode.", ""]
        md += _table(["model", "mode", "members", "members ms/structure", "split", *MODE_METRICS,
                      "checks"],
                     [[m["model_id"][:12], m["mode"], m["members"], m["members_ms_per_structure"], s,
                       *(v.get(k) for k in MODE_METRICS), "PASS" if m["passed"] else "FAIL"]
                      for m in modes for s, v in m["metrics"].items()])
        md += [""]
    if images:
        md += ["## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in images] + [""]
    return "\n".join(md)


def write_plots(report: Mapping[str, Any], out_dir: Path) -> list[Path]:
    """Parity per split, coverage vs nominal, coverage per cluster, decision counts."""
    paths = [plots.parity_plot(d["y"], d["q50"], d["lo"], d["hi"], out_dir / f"parity_{s}.png",
                               title=f"{s}: q50 with calibrated interval")
             for s, d in report["plot_data"].items()]
    if report.get("coverage_curve"):
        curve = {k: v for k, v in report["coverage_curve"].items() if k != "levels"}
        paths.append(plots.coverage_curve_plot(report["coverage_curve"]["levels"], curve,
                                               out_dir / "coverage_vs_nominal.png"))
    per_cluster = {s: c for s, c in report["cluster_coverage"].items() if c}
    if per_cluster:
        paths.append(plots.cluster_coverage_plot(per_cluster, report["target_coverage"],
                                                 out_dir / "coverage_per_cluster.png"))
    paths.append(plots.decision_counts_plot(report["decision_counts"],
                                            out_dir / "decision_counts.png"))
    return paths


def write_report(report: Mapping[str, Any], out_dir: str | Path) -> list[Path]:
    """Write governance.json (without plot_data), PNG plots and report.md; returns the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    images = write_plots(report, out_dir)
    body = _jsonable({k: v for k, v in report.items() if k != "plot_data"})
    p_json = out_dir / GOVERNANCE_FILE
    p_json.write_text(json.dumps(body, indent=2, allow_nan=False))
    p_md = out_dir / REPORT_FILE
    p_md.write_text(render_markdown(report, [p.name for p in images]))
    return [p_json, p_md, *images]
