"""Structure validation and reject rows (cathode_ray/data/validate.py)."""

from __future__ import annotations

import gzip
import itertools
import json
import math
from pathlib import Path

import pytest
from pymatgen.core import Lattice, Structure

from cathode_ray.data.library import iter_library
from cathode_ray.data.records import Reject, RejectCode
from cathode_ray.data.validate import (
    CompactStructure,
    ValidationConfig,
    validate_raw,
    validate_row,
    validate_rows,
    validate_structure,
)
from tests.data.badfiles import licoo2, write_bad_library, write_good_library

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"  # ../shared/data of the repo
DEFAULT = ValidationConfig()


def _check(structure: Structure, config: ValidationConfig = DEFAULT, **labels) -> RejectCode | None:
    reject = validate_structure(structure, structure_id="t", source="test", config=config,
                                labels=labels or None)
    return None if reject is None else reject.reason


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="max_atoms"):
        ValidationConfig(max_atoms=0)
    with pytest.raises(ValueError, match="cutoff"):
        ValidationConfig(cutoff=0.4)
    with pytest.raises(ValueError, match="transition_metals"):
        ValidationConfig(transition_metals=("Co", "Am"))
    with pytest.raises(ValueError, match="occupancy_tolerance"):
        ValidationConfig(occupancy_tolerance=0.5)
    with pytest.raises(TypeError):
        ValidationConfig(500)  # type: ignore[misc]  # keyword-only


def test_valid_structure_passes() -> None:
    assert _check(licoo2()) is None


def test_each_check_on_built_structures() -> None:
    base = licoo2()
    disordered = base.copy()
    disordered.replace(1, {"Co": 0.5, "Ni": 0.5})
    assert _check(disordered) == RejectCode.PARTIAL_OCCUPANCY
    assert _check(base.make_supercell((7, 7, 1), in_place=False)) == RejectCode.TOO_MANY_ATOMS
    assert _check(base, ValidationConfig(max_atoms=11)) == RejectCode.TOO_MANY_ATOMS
    heavy = base.copy()
    heavy.replace(0, "Am")
    assert _check(heavy) == RejectCode.UNSUPPORTED_ELEMENT
    left = Structure(Lattice(-base.lattice.matrix), base.species, base.frac_coords)
    assert _check(left) == RejectCode.DEGENERATE_LATTICE
    twin = base.copy()
    twin.append("O", base[-1].frac_coords)  # exactly on top of another atom: distance 0
    assert _check(twin) == RejectCode.OVERLAPPING_ATOMS
    assert _check(twin, ValidationConfig(require_li=False)) == RejectCode.OVERLAPPING_ATOMS


def test_nan_and_degenerate_never_reach_neighbour_search() -> None:
    d = licoo2().as_dict()
    d["sites"][0]["abc"] = [math.nan, 0.0, 0.0]
    assert _check(Structure.from_dict(d)) == RejectCode.NON_FINITE_COORDINATES
    d = licoo2().as_dict()
    d["lattice"]["matrix"] = [[math.nan, 0, 0], [0, 3, 0], [0, 0, 3]]
    assert _check(Structure.from_dict(d)) == RejectCode.DEGENERATE_LATTICE
    d["lattice"]["matrix"] = [[0, 0, 0], [0, 0, 0], [0, 0, 0]]
    assert _check(Structure.from_dict(d)) == RejectCode.DEGENERATE_LATTICE


def test_far_sites_and_thin_cells_are_rejected_before_the_neighbour_search(monkeypatch) -> None:
    """Inputs that would make the neighbour search run for minutes (or out of memory) are rejected
    by cheap checks; the search itself must never be reached for them."""
    def no_search(*args: object, **kwargs: object) -> None:
        raise AssertionError("neighbour search reached")

    monkeypatch.setattr(Structure, "get_neighbor_list", no_search)
    d = licoo2().as_dict()
    d["sites"][0]["abc"] = [1e7, 0.3, 0.2]  # e.g. Cartesian values under a "Direct" header
    reject = validate_structure(Structure.from_dict(d), structure_id="s", source="x",
                                config=ValidationConfig())
    assert reject.reason == RejectCode.NON_FINITE_COORDINATES and "cells outside" in reject.message
    thin = Structure(Lattice.orthorhombic(1e-5, 30, 30), ["Li", "Co", "O", "O"],
                     [[0, 0, 0], [0, 0.1, 0.1], [0, 0.2, 0.1], [0, 0.1, 0.2]])
    assert _check(thin) == RejectCode.OVERLAPPING_ATOMS
    base = licoo2()
    crowded = Structure(Lattice(base.lattice.matrix * 0.2), base.species, base.frac_coords)
    assert min(crowded.lattice.abc) > 0.5  # not caught by the cell-vector rule
    assert _check(crowded) == RejectCode.OVERLAPPING_ATOMS  # 0.04 A^3 per atom < 0.088
    monkeypatch.undo()
    near = licoo2().as_dict()
    near["sites"][0]["abc"] = [c + k for c, k in zip(near["sites"][0]["abc"], (3, -2, 1), strict=True)]
    # a few cells out: the same crystal, accepted
    assert _check(Structure.from_dict(near)) is None


def test_isolated_atom_depends_on_cutoff() -> None:
    s = Structure(Lattice.cubic(20.0), ["Li", "Co", "O", "O"],
                  [[0, 0, 0], [1.9, 0, 0], [3.8, 0, 0], [3.8, 0, 6.8]], coords_are_cartesian=True)
    assert _check(s) == RejectCode.ISOLATED_ATOM  # last O is 6.8 A from its nearest neighbour
    assert _check(s, ValidationConfig(cutoff=7.5)) is None
    assert _check(s, ValidationConfig(reject_isolated=False)) is None  # ingest of labelled MP data


def test_scope_messages_say_what_is_missing() -> None:
    s = licoo2()
    s.replace_species({"Li": "Na", "Co": "Al"})
    reject = validate_structure(s, structure_id="t", source="x", config=DEFAULT)
    assert reject.reason == RejectCode.OUT_OF_SCOPE
    assert "no Li" in reject.message and "no transition metal" in reject.message
    assert _check(s, ValidationConfig(require_li=False, require_tm=False)) is None


def test_missing_label_only_when_required() -> None:
    labelled = ValidationConfig(require_label=True)
    assert _check(licoo2(), labelled) == RejectCode.MISSING_LABEL
    assert _check(licoo2(), labelled, energy_above_hull=math.nan) == RejectCode.MISSING_LABEL
    assert _check(licoo2(), labelled, energy_above_hull=0.02) is None
    assert _check(licoo2()) is None


def test_bad_corpus_gives_expected_codes(tmp_path: Path) -> None:
    expected = write_bad_library(tmp_path)
    raw = list(iter_library(str(tmp_path)))
    valid, rejects = validate_rows(raw, DEFAULT)
    assert valid == []
    assert len(rejects) == len(raw) == len(expected)
    got = {Path(r["source"]).name: RejectCode(r["reason"]) for r in rejects}
    assert got == expected
    assert set(expected.values()) >= set(RejectCode) - {RejectCode.MISSING_LABEL,
                                                         RejectCode.INFERENCE_FAILED}
    assert all(r["message"] for r in rejects)


def test_good_and_bad_together_conserve_inputs(tmp_path: Path) -> None:
    counts = write_good_library(tmp_path / "good")
    write_bad_library(tmp_path / "bad")
    raw = list(iter_library(str(tmp_path)))
    valid, rejects = validate_rows(raw, DEFAULT)
    assert len(valid) == sum(counts.values())
    assert len(valid) + len(rejects) == len(raw)
    ids = [r["structure_id"] for r in valid] + [r["structure_id"] for r in rejects]
    assert sorted(ids) == sorted(r["structure_id"] for r in raw)
    row = next(r for r in valid if r["structure_id"] == "list-b")
    assert row["formula"] == "LiMn2O4" and row["chemsys"] == "Li-Mn-O" and row["nsites"] == 14
    assert row["energy_above_hull"] == pytest.approx(0.012)
    assert Structure.from_str(row["structure_json"], fmt="json").composition.reduced_formula == "LiMn2O4"


def test_duplicate_ids_first_wins_and_validate_row_has_no_dup_check() -> None:
    raw = {"structure_id": "same", "source": "a", "fmt": "pymatgen_json", "error": "",
           "payload": licoo2().to_json()}
    valid, rejects = validate_rows([raw, {**raw, "source": "b"}, {**raw, "source": "c"}], DEFAULT)
    assert [v["source"] for v in valid] == ["a"]
    assert [r["reason"] for r in rejects] == ["duplicate_id"] * 2 and "from a" in rejects[0]["message"]
    good, bad = validate_row(raw, DEFAULT)
    assert bad is None and good["structure_id"] == "same"
    good, bad = validate_row({**raw, "payload": "{}"}, DEFAULT)
    assert good is None and bad["reason"] == "unparseable"


def test_real_snapshot_sample_validates() -> None:
    path = SHARED / "mp_litmo_summary.jsonl.gz"
    if not path.exists():
        pytest.skip(f"MP snapshot not found at {path} (expected ../shared/data next to the repo)")
    with gzip.open(path, "rt") as fh:
        docs = [json.loads(line) for line in itertools.islice(fh, 60)]
    raw = [{"structure_id": d["material_id"], "source": "mp", "fmt": "pymatgen_json", "error": "",
            "payload": json.dumps(d["structure"]), "energy_above_hull": d["energy_above_hull"]}
           for d in docs]
    valid, rejects = validate_rows(raw, ValidationConfig(require_label=True))
    assert len(valid) + len(rejects) == len(docs)
    assert len(valid) >= 0.95 * len(docs), rejects


def test_validate_raw_returns_the_structure_or_the_reject() -> None:
    good = {"structure_id": "a", "source": "s", "fmt": "pymatgen_json", "payload": licoo2().to_json()}
    checked = validate_raw(good, ValidationConfig())
    assert isinstance(checked, Structure) and checked.composition.reduced_formula == "LiCoO2"
    bad = validate_raw({**good, "payload": "{}"}, ValidationConfig())
    assert isinstance(bad, Reject) and bad.reason == RejectCode.UNPARSEABLE


def test_a_cif_with_far_too_many_site_rows_is_rejected_before_it_is_built(monkeypatch) -> None:
    """pymatgen's CIF build is quadratic in the sites (6.7 s for 6,912); the rows give it away."""
    from pymatgen.io.cif import CifParser, CifWriter

    built: list[int] = []
    real = CifParser.parse_structures

    def counting(self, *args, **kwargs):
        built.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(CifParser, "parse_structures", counting)
    cif = str(CifWriter(licoo2().make_supercell((2, 2, 2), in_place=False)))  # 96 rows, P1
    row = {"structure_id": "big", "source": "s", "fmt": "cif", "payload": cif}
    small = ValidationConfig(max_atoms=20)  # cap 4 x 20 = 80 rows < 96
    reject = validate_raw(row, small)
    assert isinstance(reject, Reject) and reject.reason == RejectCode.TOO_MANY_ATOMS
    assert "96 rows (> 80" in reject.message and "max_atoms=20" in reject.message
    assert not built
    within = validate_raw(row, ValidationConfig(max_atoms=24))  # 96 rows: built, then too big
    assert isinstance(within, Reject) and within.reason == RejectCode.TOO_MANY_ATOMS
    assert "96 sites > max_atoms=24" in within.message and built
    assert isinstance(validate_raw(row, ValidationConfig()), Structure)


def test_sites_rounded_below_or_above_full_occupancy_are_filled() -> None:
    """A database CIF writes full sites as 0.9999 or 1.0001: both screen as full; 0.98 does not."""
    from pymatgen.io.cif import CifWriter

    text = str(CifWriter(licoo2()))
    rows = text.splitlines()
    last = max(i for i, line in enumerate(rows) if line.split()[-1:] == ["1"])

    def raw(occupancy: str, config: ValidationConfig = DEFAULT) -> Structure | Reject:
        edited = rows[:last] + [rows[last].rsplit(" ", 1)[0] + " " + occupancy] + rows[last + 1:]
        row = {"structure_id": occupancy, "source": "s", "fmt": "cif", "payload": "\n".join(edited)}
        return validate_raw(row, config)

    for occupancy in ("0.9999", "1.0001", "0.995"):
        filled = raw(occupancy)
        assert isinstance(filled, Structure) and filled.is_ordered, occupancy
        assert filled.composition == licoo2().composition
    for occupancy, config in (("0.98", DEFAULT), ("0.995", ValidationConfig(occupancy_tolerance=0.001))):
        reject = raw(occupancy, config)
        assert isinstance(reject, Reject) and reject.reason == RejectCode.PARTIAL_OCCUPANCY
    mixed = licoo2()
    mixed.replace(1, {"Co": 0.995, "Ni": 0.005})  # two elements on a site stay disordered
    row = {"structure_id": "m", "source": "s", "fmt": "pymatgen_json", "payload": mixed.to_json()}
    reject = validate_raw(row, DEFAULT)
    assert isinstance(reject, Reject) and reject.reason == RejectCode.PARTIAL_OCCUPANCY


def test_compact_structure_round_trips_elements_and_geometry() -> None:
    import pickle

    import numpy as np

    s = licoo2()
    s.add_oxidation_state_by_element({"Li": 1, "Co": 3, "O": -2})
    compact = pickle.loads(pickle.dumps(CompactStructure.from_structure(s)))
    back = compact.to_structure()
    assert [site.specie.symbol for site in back] == [site.specie.symbol for site in s]
    np.testing.assert_array_equal(back.frac_coords, s.frac_coords)
    np.testing.assert_array_equal(back.lattice.matrix, s.lattice.matrix)
    assert back.composition.reduced_formula == "LiCoO2"  # oxidation states are not carried
    disordered = licoo2()
    disordered.replace(1, {"Co": 0.5, "Ni": 0.5})
    with pytest.raises(ValueError, match="ordered"):
        CompactStructure.from_structure(disordered)
