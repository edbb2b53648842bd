"""End to end on real data (local runner): dataset -> trained, calibrated model dir -> report."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from cathode_ray.calibrate.calibrator import Calibrator
from cathode_ray.model.ensemble import Ensemble
from cathode_ray.train.ensemble import EnsembleTrainConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "screen"))
from tiny_model import REFERENCES, build_tiny_model, shared_data_missing  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if (msg := shared_data_missing()) is not None:
        pytest.skip(msg)
    return build_tiny_model(tmp_path_factory.mktemp("ens"), n=40, members=2)


def test_config_validates() -> None:
    with pytest.raises(ValueError, match="seeds"):
        EnsembleTrainConfig(data="d", out="o", references="mp", members=6)
    with pytest.raises(ValueError, match="early_stopping"):
        EnsembleTrainConfig(data="d", out="o", references="mp", early_stopping="test")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="holdout_fraction"):
        EnsembleTrainConfig(data="d", out="o", references="mp", holdout_fraction=0.0)


def test_holdout_early_stopping_keeps_val_for_calibration_only() -> None:
    import numpy as np

    from cathode_ray.train.ensemble import fit_and_stop_rows

    formulas = [{"Li": 1.0, "Co": 1.0, "O": 2.0}, {"Li": 1.0, "Mn": 2.0, "O": 4.0},
                {"Li": 1.0, "Fe": 1.0, "P": 1.0, "O": 4.0}, {"Li": 2.0, "Mn": 1.0, "O": 3.0}]
    split = np.array(["train"] * 80 + ["val"] * 20 + ["test"] * 20)
    comps = [formulas[i % 4] for i in range(100)] + [formulas[0]] * 20
    seed_card = EnsembleTrainConfig(data="d", out="o", references="mp")
    fit, stop = fit_and_stop_rows(seed_card, split, comps)
    assert (split[fit] == "train").all() and (split[stop] == "val").all() and len(fit) == 80
    holdout = EnsembleTrainConfig(data="d", out="o", references="mp", early_stopping="holdout",
                                  holdout_fraction=0.25)
    fit, stop = fit_and_stop_rows(holdout, split, comps)
    assert (split[stop] == "train").all() and len(stop) == 20  # one of four formulas, whole
    assert sorted([*fit, *stop]) == list(range(80))
    assert len({str(comps[i]) for i in stop}) == 1 and not {str(comps[i]) for i in stop} & {str(comps[i]) for i in fit}
    with pytest.raises(ValueError, match="runner"):
        EnsembleTrainConfig(data="d", out="o", references="mp", runner="slurm")  # type: ignore[arg-type]


@pytest.mark.slow
def test_manifest_pins_everything(model_dir: Path) -> None:
    manifest = json.loads((model_dir / "manifest.json").read_text())
    assert manifest["format_version"] == 2  # model_id covers the whole manifest
    assert manifest["backbone"]["name"] == "chgnet-0.3.0" and len(manifest["backbone"]["weights_sha256"]) == 64
    assert manifest["data_version"]["count"] == 40 and len(manifest["data_version"]["sha256"]) == 64
    assert [m["seed"] for m in manifest["members"]] == [42, 43]
    assert all({"epochs_run", "best_epoch", "val_mae", "val_spearman"} <= set(m) for m in manifest["members"])
    assert {"member_0.pt", "member_1.pt", "normalizer.json", "conformal_params.json", "triage.json",
            "ood_params.json", "ood_train.npz", "soap_clusterer.json"} == set(manifest["files"])
    assert manifest["config"]["head"]["mode"] == "delta"
    ens = Ensemble.load(str(model_dir))
    cal = Calibrator.from_files(ens.files)
    assert cal.method in cal.conformal and ens.soap_clusterer() is not None


@pytest.mark.slow
def test_prepare_keeps_only_the_requested_splits(model_dir: Path) -> None:
    import numpy as np
    import torch

    from cathode_ray.train.ensemble import prepare

    backbone, data = Ensemble.load(str(model_dir)).backbone, str(model_dir.parent / "dataset")
    refs = f"snapshot:{REFERENCES}"
    full = prepare(data, backbone, refs, cache_dir=None)
    part = prepare(data, backbone, refs, cache_dir=None, splits=("val", "test"))
    rows = np.flatnonzero(np.isin(full.split, ["val", "test"]))
    assert 0 < len(rows) < len(full.ids) and part.ids == [full.ids[i] for i in rows]
    assert part.split.tolist() == full.split[rows].tolist()
    want = full.part_rows(rows)
    for name in ("y", "hull_pa", "corr_pa", "has_ref"):
        torch.testing.assert_close(getattr(part.data, name), getattr(want, name), rtol=0, atol=0,
                                   equal_nan=True, msg=name)
    with pytest.raises(ValueError, match="no rows"):
        prepare(data, backbone, refs, cache_dir=None, splits=("nope",))


@pytest.mark.slow
def test_report_runs_on_the_dataset(model_dir: Path, tmp_path: Path) -> None:
    from cathode_ray.report.run import ReportConfig, run

    rep = run(ReportConfig(model=str(model_dir), data=str(model_dir.parent / "dataset"),
                           references=f"snapshot:{REFERENCES}", out=str(tmp_path / "rep"), cache_dir=None))
    assert len(rep["checks"]) == 6
    assert (tmp_path / "rep" / "governance.json").is_file() and (tmp_path / "rep" / "report.md").is_file()
    assert rep["model"]["model_id"] == json.loads((model_dir / "manifest.json").read_text())["model_id"]
    assert rep["evaluation_split"] == "test" and rep["checks"][1]["name"] == "spearman_test"
    # every row of the training dataset would score train and val rows in-sample: refused
    with pytest.raises(ValueError, match="trained on"):
        run(ReportConfig(model=str(model_dir), data=str(model_dir.parent / "dataset"), split="all",
                         references=f"snapshot:{REFERENCES}", out=str(tmp_path / "all"), cache_dir=None))
    assert not (tmp_path / "all").exists()


@pytest.mark.slow
def test_report_on_another_snapshots_dataset_uses_the_models_clusters(model_dir: Path,
                                                                     tmp_path: Path) -> None:
    """Another ingest numbers its own SOAP clusters: the report must label rows with the model's
    clusterer, as the screen does, and draw no coverage curve refitted on that dataset's val."""
    import shutil

    import numpy as np
    import pandas as pd

    from cathode_ray.report.run import ReportConfig, run

    own = model_dir.parent / "dataset"
    other = tmp_path / "other_snapshot"
    shutil.copytree(own, other)
    version = json.loads((other / "DATA_VERSION.json").read_text())
    (other / "DATA_VERSION.json").write_text(json.dumps({**version, "sha256": "0" * 64}))
    df = pd.read_parquet(other / "materials.parquet")
    k = int(df["soap_cluster"].max()) + 1
    original = df["soap_cluster"].to_numpy().copy()
    df["soap_cluster"] = ((original + 1) % k).astype(np.int32)  # that ingest's own numbering
    df.to_parquet(other / "materials.parquet", index=False)
    rep = run(ReportConfig(model=str(model_dir), data=str(other), split="all",
                           references=f"snapshot:{REFERENCES}", out=str(tmp_path / "rep"),
                           cache_dir=None))
    assert rep["clusters_from"] == "model" and rep["coverage_curve"] is None
    n_per_cluster = {int(c): v["n"] for c, v in rep["cluster_coverage"]["all"].items()}
    ids, counts = np.unique(original, return_counts=True)
    assert n_per_cluster == {int(c): float(n) for c, n in zip(ids, counts, strict=True)}
    assert not (tmp_path / "rep" / "coverage_vs_nominal.png").exists()


@pytest.mark.slow
def test_report_compares_head_only_with_last_block(model_dir: Path, tmp_path: Path) -> None:
    """The issue's choice for users: head-only vs last-block members, cost and quality side by side."""
    from cathode_ray.report.run import ReportConfig, run
    from cathode_ray.train.ensemble import run as train

    data = str(model_dir.parent / "dataset")
    head_only = tmp_path / "head_only"
    train(EnsembleTrainConfig(data=data, out=str(head_only), references=f"snapshot:{REFERENCES}",
                              members=2, max_epochs=2, runner="local", cache_dir=None,
                              train_last_block=False, early_stopping="holdout"))
    rep = run(ReportConfig(model=str(model_dir), data=data, references=f"snapshot:{REFERENCES}",
                           out=str(tmp_path / "rep"), cache_dir=None, compare=(str(head_only),)))
    manifest = json.loads((head_only / "manifest.json").read_text())  # stopped on held-out train rows
    assert manifest["config"]["early_stopping"] == "holdout" and manifest["members"][0]["epochs_run"] == 2
    modes = rep["ensemble_modes"]
    assert [m["mode"] for m in modes] == ["last-block", "head-only"]
    for m in modes:
        assert m["members"] == 2 and m["members_ms_per_structure"] > 0
        assert set(m["metrics"]) == set(rep["metrics"])
        assert 0.0 <= m["metrics"]["val"]["coverage"] <= 1.0
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "## Ensemble modes" in md and "head-only" in md and "last-block" in md
    saved = json.loads((tmp_path / "rep" / "governance.json").read_text())
    assert len(saved["ensemble_modes"]) == 2


@pytest.mark.slow
def test_cli_calibrate_refits_calibration_only(model_dir: Path, tmp_path: Path) -> None:
    import shutil

    from typer.testing import CliRunner

    from cathode_ray.cli import app

    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    before = json.loads((model / "manifest.json").read_text())
    args = ["calibrate", "--model", str(model), "--data", str(model_dir.parent / "dataset"),
            "--references", f"snapshot:{REFERENCES}"]
    ids = []
    for flag, has_fallback in (("--no-zero-shot-fallback", False), ("--zero-shot-fallback", True)):
        res = CliRunner().invoke(app, [*args, flag])
        assert res.exit_code == 0, res.output
        after = json.loads((model / "manifest.json").read_text())
        ids.append(after["model_id"])
        assert after["model_id"] in res.output
        for name in ("member_0.pt", "member_1.pt", "normalizer.json"):  # members untouched
            assert after["files"][name] == before["files"][name]
        cal = Calibrator.from_files(Ensemble.load(str(model)).files)  # hashes verify
        assert (cal.fallback is not None) == has_fallback
    assert ids == [ids[0], before["model_id"]] and ids[0] != before["model_id"]  # deterministic refits
