"""Parsing raw rows into Structures (cathode_ray/data/parse.py); reading is in test_library.py."""

from __future__ import annotations

import json

import pytest
from pymatgen.core import Structure

from cathode_ray.data.parse import parse_raw, structure_from_untrusted_dict
from cathode_ray.data.records import Reject, RejectCode, short_error
from tests.data.badfiles import licoo2


def _row(fmt: str, payload: str) -> dict[str, str]:
    return {"structure_id": "x", "source": "s", "fmt": fmt, "payload": payload, "error": ""}


def test_parse_raw_rejects_garbage_and_non_periodic_xyz() -> None:
    bad = {"structure_id": "x", "source": "s", "fmt": "poscar", "payload": "hello", "error": ""}
    assert parse_raw(bad).reason == RejectCode.UNPARSEABLE
    xyz = {"structure_id": "y", "source": "s", "fmt": "extxyz", "error": "",
           "payload": "2\nmolecule\nLi 0 0 0\nO 1.6 0 0\n"}
    assert parse_raw(xyz).reason == RejectCode.DEGENERATE_LATTICE
    odd = {"structure_id": "z", "source": "s", "fmt": "pickle", "payload": "", "error": ""}
    assert parse_raw(odd).reason == RejectCode.UNPARSEABLE


def test_reader_error_rows_become_rejects_with_their_code() -> None:
    row = {**_row("error", "s: cannot read file"), "error": "unreadable_file"}
    reject = parse_raw(row)
    assert isinstance(reject, Reject)
    assert (reject.reason, reject.message) == (RejectCode.UNREADABLE_FILE, "s: cannot read file")


def test_every_text_format_parses_the_same_structure() -> None:
    from pymatgen.io.cif import CifWriter
    from pymatgen.io.res import ResIO
    from pymatgen.io.vasp import Poscar

    s = licoo2()
    payloads = {"cif": str(CifWriter(s)), "poscar": Poscar(s).get_str(), "res": ResIO.structure_to_str(s),
                "pymatgen_json": json.dumps(s.as_dict())}
    for fmt, payload in payloads.items():
        parsed = parse_raw(_row(fmt, payload))
        assert isinstance(parsed, Structure), (fmt, parsed)
        assert parsed.composition == s.composition and parsed.volume == pytest.approx(s.volume), fmt


def test_untrusted_dict_keeps_plain_data_and_refuses_object_markers() -> None:
    d = licoo2().as_dict()
    d["sites"][0]["properties"] = {"magmom": 1.0}
    d["sites"][1]["species"][0]["oxidation_state"] = 1
    s = structure_from_untrusted_dict(d)
    assert s == licoo2() and "magmom" not in s.site_properties  # site properties are dropped
    assert s[1].specie.oxi_state == 1
    bad = licoo2().as_dict()
    bad["sites"][0]["properties"] = {"x": {"@module": "os", "@class": "system"}}
    with pytest.raises(ValueError, match="@module"):
        structure_from_untrusted_dict(bad)
    with pytest.raises(ValueError, match="not a pymatgen Structure dict"):
        structure_from_untrusted_dict({"lattice": {"matrix": [[1, 0, 0]]}, "sites": [{"abc": [0, 0, 0]}]})


def test_short_error_is_one_line_and_bounded() -> None:
    assert short_error(ValueError("a\nb")) == "a b"
    assert short_error(ValueError("x" * 500), limit=10) == "x" * 10 + "..."
