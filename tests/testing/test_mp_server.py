"""Tests for the local MP server, driven by the real mp-api MPRester and by plain HTTP."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
import warnings
from typing import Any

import pytest
from mp_api.client import MPRester
from pymatgen.core import Structure
from pymatgen.entries.computed_entries import ComputedStructureEntry

from cathode_ray.testing.mp_server import MPServer, answer_collection, thermo_docs_from_entries
from tests.conftest import TEST_API_KEY


def _get(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _entry_dicts(docs: list[dict]) -> list[dict]:
    """GGA+U ComputedStructureEntry dicts (total energy eV) for the tiny summary docs."""
    return [
        ComputedStructureEntry(
            Structure.from_dict(doc["structure"]),
            energy=doc["energy_per_atom"] * doc["nsites"],
            parameters={"run_type": "GGA+U"},
            data={"material_id": doc["material_id"]},
            entry_id=doc["material_id"] + "-GGA+U",
        ).as_dict()
        for doc in docs
    ]


def test_heartbeat_and_db_version(mp_server: MPServer) -> None:
    status, body = _get(mp_server.url + "heartbeat")
    assert status == 200 and body["db_version"] == "2025.04.10"
    mp_server.set_db_version("2025.04.01")
    assert _get(mp_server.url + "heartbeat")[1]["db_version"] == "2025.04.01"


def test_url_and_lifecycle() -> None:
    server = MPServer()
    with pytest.raises(RuntimeError, match="not running"):
        _ = server.url
    with server as url:
        assert url.startswith("http://127.0.0.1:") and url.endswith("/")
    with pytest.raises(RuntimeError):
        _ = server.url


def test_paging_projection_and_errors(mp_server: MPServer, tiny_docs: list[dict]) -> None:
    mp_server.set_documents(tiny_docs)
    base = mp_server.url + "materials/summary/"
    status, body = _get(base + "?elements=Li,O&_skip=5&_limit=4&_fields=material_id,nsites")
    assert status == 200
    assert body["meta"]["total_doc"] == 12
    assert [d["material_id"] for d in body["data"]] == [f"mp-{1000 + k}" for k in range(5, 9)]
    assert set(body["data"][0]) == {"material_id", "nsites"}
    status, body = _get(base + "?chemsys=O-Li-Co&_all_fields=true")
    assert [d["material_id"] for d in body["data"]] == ["mp-1006", "mp-1007", "mp-1008"]
    assert "structure" in body["data"][0]
    status, body = _get(base + "?band_gap_min=1")
    assert status == 400 and "band_gap_min" in body["error"]
    assert _get(mp_server.url + "materials/tasks/")[0] == 404
    assert mp_server.requests[-1].status == 404


def test_answer_collection_filters(tiny_docs: list[dict]) -> None:
    def ids(params: dict[str, str]) -> list[str]:
        return [
            d["material_id"] for d in answer_collection(tiny_docs, params, db_version="x")["data"]
        ]

    assert ids({"elements": "Li,Ni", "exclude_elements": "Fe"}) == ["mp-1009", "mp-1010", "mp-1011"]
    assert ids({"formula": "Li3FeO4"}) == ["mp-1004"]
    assert ids({"material_ids": "mp-1000,mp-1011"}) == ["mp-1000", "mp-1011"]
    assert ids({"nelements_min": "4"}) == []


def test_real_mprester_summary_search(mp_server: MPServer, tiny_docs: list[dict]) -> None:
    mp_server.set_documents(tiny_docs)
    with MPRester(api_key=TEST_API_KEY, endpoint=mp_server.url, mute_progress_bars=True) as mpr:
        assert mpr.db_version == "2025.04.10"
        docs = mpr.materials.summary.search(
            elements=["Li", "O", "Co"], fields=["material_id", "energy_above_hull", "structure"]
        )
    assert sorted(str(d.material_id) for d in docs) == ["mp-1006", "mp-1007", "mp-1008"]
    assert len(docs[0].structure) == 8
    summary = [r for r in mp_server.requests if r.path == "/materials/summary"]
    assert summary[-1].params["elements"] == "Li,O,Co"


def test_real_mprester_rejects_short_key(mp_server: MPServer) -> None:
    from mp_api.client.core.client import MPRestError

    with pytest.raises(MPRestError, match="32 characters"):
        MPRester(api_key="test-key", endpoint=mp_server.url)


def test_real_mprester_entries_in_chemsys(mp_server: MPServer, tiny_docs: list[dict]) -> None:
    thermo = thermo_docs_from_entries(_entry_dicts(tiny_docs))
    mp_server.set_documents(summary_docs=[], thermo_docs=thermo)
    with MPRester(api_key=TEST_API_KEY, endpoint=mp_server.url, mute_progress_bars=True) as mpr:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            entries = mpr.get_entries_in_chemsys(
                ["Li", "Mn", "O"], additional_criteria={"thermo_types": ["GGA_GGA+U"]}
            )
    assert sorted(e.data["material_id"] for e in entries) == ["mp-1000", "mp-1001", "mp-1002"]
    request = [r for r in mp_server.requests if r.path == "/materials/thermo"][-1]
    assert request.params["thermo_types"] == "GGA_GGA+U"
    assert set(request.params["chemsys"].split(",")) == {
        "Li", "Mn", "O", "Li-Mn", "Li-O", "Mn-O", "Li-Mn-O"
    }  # fmt: skip


def test_max_limit_validation() -> None:
    with pytest.raises(ValueError, match="max_limit"):
        MPServer(max_limit=0)
