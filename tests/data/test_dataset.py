"""Tests for cathode_ray.data.dataset: ingest from snapshot and from the (local) MP API."""

from __future__ import annotations

import copy
import gzip
import json
from pathlib import Path

import pandas as pd
import pytest

from cathode_ray.data.dataset import (
    IngestConfig,
    load_clusterer,
    load_data_version,
    load_dataset,
    load_rejects,
    load_structures,
    run,
)
from cathode_ray.data.sources import SourceError, content_hash, read_snapshot
from cathode_ray.data.splits import SoapConfig
from cathode_ray.testing.mp_server import MPServer, thermo_docs_from_summary
from tests.conftest import SUMMARY_FILE

FAST = SoapConfig(n_max=2, l_max=2, n_clusters=3)


def _snapshot(path: Path, docs: list[dict]) -> str:
    with gzip.open(path, "wt") as fh:
        fh.writelines(json.dumps(d) + "\n" for d in docs)
    return f"snapshot:{path}"


def _assert_no_formula_in_two_splits(df: pd.DataFrame) -> None:
    assert df.groupby("formula")["split"].nunique().max() == 1


def test_ingest_tiny_snapshot_with_bad_rows(tmp_path: Path, tiny_docs: list[dict]) -> None:
    no_label = copy.deepcopy(tiny_docs[0])
    no_label["material_id"], no_label["energy_above_hull"] = "mp-bad-label", None
    broken = copy.deepcopy(tiny_docs[1])
    broken["material_id"], broken["structure"] = "mp-bad-structure", {"sites": "nope"}
    no_li = copy.deepcopy(tiny_docs[2])
    no_li["material_id"] = "mp-no-li"
    no_li["structure"]["sites"] = [
        s for s in no_li["structure"]["sites"] if s["species"][0]["element"] != "Li"
    ]
    docs = tiny_docs + [no_label, broken, no_li, tiny_docs[3]]  # + a duplicate id
    out = tmp_path / "ds"
    result = run(
        IngestConfig(
            source=_snapshot(tmp_path / "s.jsonl.gz", docs), out=str(out), soap=FAST, verbose=False
        )
    )
    assert (result.n_inputs, result.n_rows, result.n_rejects) == (16, 12, 4)
    rejects = load_rejects(str(out)).set_index("structure_id")["reason"].to_dict()
    assert rejects == {
        "mp-bad-label": "missing_label",
        "mp-bad-structure": "unparseable",
        "mp-no-li": "out_of_scope",
        "mp-1003": "duplicate_id",
    }
    df = load_dataset(str(out))
    assert len(df) == 12 and (df["structure_id"] == df["material_id"]).all()
    assert set(df["split"]) <= {"train", "val", "test", "loco"}
    assert sum(result.split_sizes.values()) == 12
    _assert_no_formula_in_two_splits(df)
    structures = load_structures(df)
    assert [s.composition.reduced_formula for s in structures] == df["formula"].tolist()
    assert list(df.loc[0, "elements"]) == ["Li", "Mn", "O"]
    clusterer = load_clusterer(str(out))
    assert (clusterer.assign(structures) == df["soap_cluster"].to_numpy()).all()
    version = load_data_version(str(out))
    assert version["count"] == 16 and version["sha256"] == content_hash(docs)
    assert version["n_rows"] == 12 and version["db_version"] == "MP test"


def test_ingest_config_validation(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="source"):
        IngestConfig(source="http://x", out=str(tmp_path))
    with pytest.raises(ValueError, match="path"):
        IngestConfig(source="snapshot:", out=str(tmp_path))
    with pytest.raises(ValueError, match="fractions"):
        IngestConfig(source="mp", out=str(tmp_path), fractions=(0.5, 0.5, 0.5))


def test_ingest_missing_snapshot_and_dataset(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="not found"):
        run(IngestConfig(source=f"snapshot:{tmp_path}/none.jsonl", out=str(tmp_path / "o")))
    with pytest.raises(FileNotFoundError, match="ingest"):
        load_dataset(str(tmp_path))


@pytest.mark.slow  # mp-api import + 8 searches: ~10-30 s on a shared 2-core box
def test_ingest_mp_equals_snapshot(
    tmp_path: Path, mp_server: MPServer, tiny_docs: list[dict]
) -> None:
    mp_server.set_documents(tiny_docs, thermo_docs_from_summary(tiny_docs))
    mp_server.set_db_version("2025.04.01")
    via_mp = run(IngestConfig(source="mp", out=str(tmp_path / "mp"), soap=FAST, verbose=False))
    snap = _snapshot(tmp_path / "s.jsonl.gz", tiny_docs)
    via_snap = run(IngestConfig(source=snap, out=str(tmp_path / "snap"), soap=FAST, verbose=False))
    assert via_mp.data_version["sha256"] == via_snap.data_version["sha256"]
    assert via_mp.data_version["db_version"] == "2025.04.01"
    assert via_mp.data_version["query"]["elements_all"] == ["Li", "O"]
    a, b = load_dataset(str(tmp_path / "mp")), load_dataset(str(tmp_path / "snap"))
    assert a["split"].tolist() == b["split"].tolist()  # same data, same seed -> same splits


@pytest.mark.slow  # mp-api import + 8 searches
def test_ingest_mp_rejects_materials_without_gga_label(
    tmp_path: Path, mp_server: MPServer, tiny_docs: list[dict]
) -> None:
    gga = thermo_docs_from_summary(tiny_docs)
    unlabelled = gga.pop(2)["material_id"]  # no GGA_GGA+U thermo document (r2SCAN only)
    mp_server.set_documents(tiny_docs, gga)
    result = run(IngestConfig(source="mp", out=str(tmp_path / "mp"), soap=FAST, verbose=False))
    assert (result.n_inputs, result.n_rows, result.n_rejects) == (len(tiny_docs), len(tiny_docs) - 1, 1)
    rejects = load_rejects(str(tmp_path / "mp"))
    assert rejects["structure_id"].tolist() == [unlabelled]
    assert rejects["reason"].tolist() == ["missing_label"]
    assert result.data_version["query"]["label_thermo_type"] == "GGA_GGA+U"


@pytest.mark.slow
def test_ingest_real_snapshot(tmp_path: Path, shared_data: Path, capsys) -> None:
    out = tmp_path / "real"
    result = run(IngestConfig(source=f"snapshot:{shared_data / SUMMARY_FILE}", out=str(out)))
    assert result.n_inputs == 1326
    # mp-1213623 (Li3NiO6, E_hull 1.58 eV/atom) has atoms with no neighbour within 6 A; ingest
    # keeps it (reject_isolated is off for labelled MP data), screening would reject it.
    assert (result.n_rows, result.n_rejects) == (1326, 0)
    assert len(load_rejects(str(out))) == 0
    assert all(n > 0 for n in result.split_sizes.values()) and len(result.split_sizes) == 4
    df = load_dataset(str(out))
    _assert_no_formula_in_two_splits(df)
    assert (out / "DATA_VERSION.json").is_file() and (out / "soap_clusterer.json").is_file()
    assert "loco" in capsys.readouterr().out


@pytest.mark.slow
def test_ingest_mp_subset_same_hash(tmp_path: Path, shared_data: Path, mp_server: MPServer) -> None:
    docs = read_snapshot(shared_data / SUMMARY_FILE)[::26][:50]
    mp_server.set_documents(docs, thermo_docs_from_summary(docs))
    via_mp = run(IngestConfig(source="mp", out=str(tmp_path / "mp"), verbose=False))
    snap = _snapshot(tmp_path / "s.jsonl.gz", docs)
    via_snap = run(IngestConfig(source=snap, out=str(tmp_path / "snap"), verbose=False))
    assert via_mp.n_inputs == via_snap.n_inputs == 50
    assert via_mp.data_version["sha256"] == via_snap.data_version["sha256"]
