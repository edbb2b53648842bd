"""Demo library built in code (cathode_ray/data/demo.py)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pymatgen.core import Structure

from cathode_ray.data.demo import (
    PROTOTYPES,
    demo_library,
    id_formula,
    prototype_cells,
    write_demo_library,
)
from cathode_ray.data.generate import structure_fingerprint
from cathode_ray.data.library import iter_library
from cathode_ray.data.validate import ValidationConfig, validate_rows, validate_structure

ID = re.compile(r"^demo-(layered|spinel|olivine|li2mo3)-[A-Za-z0-9.]+-\d{4}$")


def _all_valid(rows: list[dict]) -> list[str]:
    config = ValidationConfig()
    failures = []
    for row in rows:
        s = Structure.from_str(row["structure_json"], fmt="json")
        reject = validate_structure(s, structure_id=row["structure_id"], source="demo", config=config)
        if reject is not None:
            failures.append(f"{reject.structure_id}: {reject.reason} {reject.message}")
    return failures


def test_prototype_compositions() -> None:
    formulas = {p.name: prototype_cells(p.name)[0].composition.reduced_formula for p in PROTOTYPES}
    assert formulas == {"layered": "LiCoO2", "spinel": "Li(CoO2)2", "olivine": "LiCoPO4",
                        "li2mo3": "Li2CoO3"}
    assert id_formula(prototype_cells("spinel")[0]) == "LiCo2O4"
    assert [len(c) for c in prototype_cells("spinel")] == [14, 56]
    assert [len(c) for c in prototype_cells("layered")] == [12, 24]


def test_small_demo_is_deterministic_distinct_and_valid() -> None:
    rows = demo_library(80, seed=3)
    assert rows == demo_library(80, seed=3)
    assert rows != demo_library(80, seed=4)
    assert len(rows) == 80 and all(ID.match(r["structure_id"]) for r in rows)
    assert len({r["structure_id"] for r in rows}) == 80
    structures = [Structure.from_str(r["structure_json"], fmt="json") for r in rows]
    assert len({structure_fingerprint(s) for s in structures}) == 80
    assert {r["structure_id"].split("-")[1] for r in rows} == {p.name for p in PROTOTYPES}
    assert max(r["nsites"] for r in rows) <= 60
    assert any(len({el.symbol for el in s.composition} & {"Ti", "V", "Cr", "Mn", "Fe", "Co", "Ni",
                                                           "Cu"}) > 1 for s in structures)
    assert all(r["source"] == "demo" and r["formula"] and r["chemsys"] for r in rows)
    assert _all_valid(rows) == []


def test_write_demo_library_round_trip(tmp_path: Path) -> None:
    path = write_demo_library(str(tmp_path / "sub" / "demo.parquet"), n=12)
    valid, rejects = validate_rows(iter_library(path), ValidationConfig())
    assert rejects == [] and len(valid) == 12
    assert [v["structure_id"] for v in valid] == [r["structure_id"] for r in demo_library(12)]


def test_negative_n_raises() -> None:
    with pytest.raises(ValueError):
        demo_library(-1)


@pytest.mark.slow
def test_full_demo_library_all_pass_validation() -> None:
    rows = demo_library(2000)
    assert len(rows) == 2000 and len({r["structure_id"] for r in rows}) == 2000
    assert _all_valid(rows) == []
