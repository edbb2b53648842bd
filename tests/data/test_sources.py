"""Tests for cathode_ray.data.sources (snapshot reading, MP fetch via the local server, hashing)."""

from __future__ import annotations

import copy
import gzip
import json
from pathlib import Path
from typing import Any

import pytest

from cathode_ray.data import sources
from cathode_ray.data.sources import (
    SourceError,
    content_hash,
    data_version,
    fetch_mp_summary,
    mp_database_version,
    read_snapshot,
)
from cathode_ray.testing.mp_server import MPServer, thermo_docs_from_summary
from tests.conftest import SUMMARY_FILE, TEST_API_KEY


def _write_jsonl(path: Path, docs: list[dict[str, Any]]) -> Path:
    text = "".join(json.dumps(d) + "\n" for d in docs)
    if path.name.endswith(".gz"):
        with gzip.open(path, "wt") as fh:
            fh.write(text)
    else:
        path.write_text(text)
    return path


@pytest.mark.parametrize("name", ["docs.jsonl", "docs.jsonl.gz"])
def test_read_snapshot_round_trip(tmp_path: Path, tiny_docs: list[dict], name: str) -> None:
    path = _write_jsonl(tmp_path / name, tiny_docs)
    assert read_snapshot(path) == json.loads(json.dumps(tiny_docs))


def test_read_snapshot_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="not found"):
        read_snapshot(tmp_path / "nope.jsonl.gz")


def test_read_snapshot_truncated_gzip(tmp_path: Path, tiny_docs: list[dict]) -> None:
    good = _write_jsonl(tmp_path / "good.jsonl.gz", tiny_docs).read_bytes()
    bad = tmp_path / "bad.jsonl.gz"
    bad.write_bytes(good[: len(good) // 2])
    with pytest.raises(SourceError, match="unreadable or truncated"):
        read_snapshot(bad)


def test_read_snapshot_bad_line_names_line(tmp_path: Path, tiny_docs: list[dict]) -> None:
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps(tiny_docs[0]) + "\n{not json\n")
    with pytest.raises(SourceError, match=r"docs.jsonl:2"):
        read_snapshot(path)
    path.write_text('{"formula_pretty": "LiCoO2"}\n')
    with pytest.raises(SourceError, match="material_id"):
        read_snapshot(path)


def test_content_hash_is_order_and_noise_invariant(tiny_docs: list[dict]) -> None:
    reference = content_hash(tiny_docs)
    assert content_hash(list(reversed(tiny_docs))) == reference
    noisy = copy.deepcopy(tiny_docs)
    noisy[0]["energy_above_hull"] += 1e-12
    noisy[0]["structure"]["sites"][0]["abc"][0] += 1e-12
    noisy[0]["formation_energy_per_atom"] = 123.0  # not part of the hash
    assert content_hash(noisy) == reference


def test_content_hash_sees_label_and_structure_changes(tiny_docs: list[dict]) -> None:
    reference = content_hash(tiny_docs)
    changed = copy.deepcopy(tiny_docs)
    changed[3]["energy_above_hull"] += 1e-4
    assert content_hash(changed) != reference
    moved = copy.deepcopy(tiny_docs)
    moved[5]["structure"]["sites"][0]["abc"][0] += 1e-3
    assert content_hash(moved) != reference
    assert content_hash(tiny_docs[:-1]) != reference


def test_data_version_fields(tiny_docs: list[dict]) -> None:
    version = data_version(tiny_docs, source="snapshot:x", query=None, db_version="v1")
    assert version["count"] == len(tiny_docs)
    assert version["sha256"] == content_hash(tiny_docs)
    assert version["date"].endswith("+00:00")
    assert {k: version[k] for k in ("source", "query", "db_version")} == {
        "source": "snapshot:x",
        "query": None,
        "db_version": "v1",
    }


def test_pinned_query_covers_all_transition_metals() -> None:
    from cathode_ray import seedcard

    assert sources.PINNED_QUERY["elements_all"] == ["Li", "O"]
    assert sources.PINNED_QUERY["elements_any"] == list(seedcard.TRANSITION_METALS)
    assert {"material_id", "structure", "energy_above_hull"} <= set(sources.SUMMARY_FIELDS)


def test_fetch_mp_summary_unions_per_metal(mp_server: MPServer, tiny_docs: list[dict]) -> None:
    mixed = copy.deepcopy(tiny_docs[0])  # Li-Mn-O doc that also contains Fe -> found twice
    mixed["material_id"], mixed["elements"] = "mp-9001", ["Fe", "Li", "Mn", "O"]
    no_li = copy.deepcopy(tiny_docs[1])
    no_li["material_id"], no_li["elements"] = "mp-9002", ["Mn", "O"]
    deprecated = copy.deepcopy(tiny_docs[2])
    deprecated["material_id"], deprecated["deprecated"] = "mp-9003", True
    served = tiny_docs + [mixed, no_li, deprecated]
    mp_server.set_documents(served, thermo_docs_from_summary(served))
    got = fetch_mp_summary()  # key and endpoint from the environment (fixture)
    assert [d["material_id"] for d in got] == sorted(d["material_id"] for d in tiny_docs + [mixed])
    assert content_hash([d for d in got if d["material_id"] != "mp-9001"]) == content_hash(
        tiny_docs
    )
    searched = [r.params["elements"] for r in mp_server.requests if r.path.endswith("summary")]
    assert {"Li,O,Ti", "Li,O,Cu", "Li,O,Mn"} <= set(searched)  # one filtered search per TM
    assert all(searched)  # never an unfiltered (S3-bound) search
    summary = [r.params for r in mp_server.requests if r.path.endswith("summary")]
    assert {p.get("deprecated") for p in summary} == {"False"}  # searches and counts


def test_fetch_mp_summary_labels_come_from_gga_thermo_docs(
    mp_server: MPServer, tiny_docs: list[dict]
) -> None:
    """MP's summary shows the mixed GGA/GGA+U/r2SCAN hull; labels must be the GGA/GGA+U ones."""
    summary = copy.deepcopy(tiny_docs)
    for k, doc in enumerate(summary):  # the summary's (mixed-hull) values differ per material
        doc["energy_above_hull"] += 0.01 * (k + 1)
        doc["formation_energy_per_atom"] += 0.02
        doc["is_stable"] = False
    gga = thermo_docs_from_summary(tiny_docs)
    no_gga = gga.pop(4)["material_id"]  # e.g. a material computed with r2SCAN only
    mixed = thermo_docs_from_summary(summary, thermo_type="GGA_GGA+U_R2SCAN")
    mp_server.set_documents(summary, gga + mixed)

    got = {d["material_id"]: d for d in fetch_mp_summary(transition_metals=["Mn", "Fe", "Co", "Ni"])}
    assert len(got) == len(tiny_docs)  # no material dropped, only its label
    for doc in tiny_docs:
        mid = doc["material_id"]
        if mid == no_gga:
            assert not set(sources.LABEL_FIELDS) & set(got[mid]) and "thermo_type" not in got[mid]
            continue
        assert got[mid]["thermo_type"] == "GGA_GGA+U"
        assert {k: got[mid][k] for k in sources.LABEL_FIELDS} == {k: doc[k] for k in sources.LABEL_FIELDS}
        assert got[mid]["structure"] == doc["structure"]
    thermo = [r for r in mp_server.requests if r.path == "/materials/thermo"]
    assert thermo and all(r.params["thermo_types"] == "GGA_GGA+U" and r.params["material_ids"]
                          for r in thermo)

    kept = {d["material_id"]: d for d in fetch_mp_summary(label_thermo_type=None)}
    assert [kept[d["material_id"]]["energy_above_hull"] for d in summary] == [
        d["energy_above_hull"] for d in summary
    ]


def test_fetch_mp_summary_detects_truncated_paging(tiny_docs: list[dict]) -> None:
    with MPServer(summary_docs=tiny_docs, max_limit=1) as url:
        with pytest.raises(SourceError, match="1 of 3"):
            fetch_mp_summary(api_key=TEST_API_KEY, endpoint=url, transition_metals=["Mn"])


def test_fetch_mp_summary_without_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MP_API_KEY", raising=False)
    with pytest.raises(SourceError, match="MP_API_KEY"):
        fetch_mp_summary(endpoint="http://127.0.0.1:9/")


def test_mp_database_version_follows_server(mp_server: MPServer) -> None:
    mp_server.set_db_version("2025.04.01")
    assert mp_database_version() == "2025.04.01"
    mp_server.set_db_version("2025.09.25")
    assert mp_database_version(endpoint=mp_server.url.rstrip("/")) == "2025.09.25"


def test_mp_database_version_unreachable() -> None:
    with MPServer() as url:
        pass  # port now closed
    with pytest.raises(SourceError, match="heartbeat"):
        mp_database_version(endpoint=url)


@pytest.mark.slow
def test_full_snapshot_same_hash_through_mp_server(shared_data: Path, mp_server: MPServer) -> None:
    docs = read_snapshot(shared_data / SUMMARY_FILE)
    assert len(docs) == 1326
    mp_server.set_documents(docs, thermo_docs_from_summary(docs))
    got = fetch_mp_summary()
    assert len(got) == 1326
    assert content_hash(got) == content_hash(docs)
