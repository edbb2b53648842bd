"""The bundled model's governance report on the real MP snapshot (issue targets, not seed-card only)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cathode_ray.data.dataset import IngestConfig
from cathode_ray.data.dataset import run as ingest
from cathode_ray.report.run import ReportConfig
from cathode_ray.report.run import run as report
from tests.conftest import REFERENCES_FILE, SUMMARY_FILE

BUNDLED = Path(__file__).resolve().parents[2] / "artifacts" / "models" / "chgnet-litmo-v1"


@pytest.mark.slow
def test_bundled_model_meets_its_targets_on_the_snapshot(tmp_path: Path, shared_data: Path) -> None:
    data = tmp_path / "litmo"
    ingest(IngestConfig(source=f"snapshot:{shared_data / SUMMARY_FILE}", out=str(data)))
    rep = report(ReportConfig(model=str(BUNDLED), data=str(data), out=str(tmp_path / "report"),
                              references=f"snapshot:{shared_data / REFERENCES_FILE}",
                              cache_dir=str(tmp_path / "cache")))
    assert rep["passed"], [c for c in rep["checks"] if not c["pass"]]
    test, loco = rep["metrics"]["test"], rep["metrics"]["loco"]
    assert test["spearman"] >= 0.85 and test["mae"] <= 0.0205
    assert 0.88 <= test["coverage"] <= 0.95 and test["false_kill_rate"] == 0.0
    # LOCO: a structure cluster with element sets absent from training takes the backbone fallback
    assert rep["ood"]["loco"]["zero_shot_fallback"] == loco["n"]
    assert loco["coverage"] >= 0.85
    zero_shot = rep["baselines"]["zero_shot_backbone"]["loco"]
    assert loco["mae"] <= zero_shot["mae"] + 1e-9 < rep["baselines"]["ensemble_q50"]["loco"]["mae"]
    assert rep["ood"]["test"]["zero_shot_fallback"] == rep["ood"]["val"]["zero_shot_fallback"] == 0
    assert (tmp_path / "report" / "report.md").is_file()
