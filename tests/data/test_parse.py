"""Parsing raw rows into Structures (cathode_ray/data/parse.py); reading is in test_library.py."""

from __future__ import annotations

import io
import json

import pytest
from pymatgen.core import Structure

from cathode_ray.data.parse import parse_raw, structure_from_untrusted_dict
from cathode_ray.data.records import Reject, RejectCode, short_error
from tests.data.badfiles import (
    asymmetric_unit_cif,
    cif_without_operations,
    licoo2,
    limn2o4,
    vasp4_poscar,
)


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


@pytest.mark.parametrize("symmetry", [
    "_space_group_name_Hall '-R 3 9'",  # no such Hall symbol
    "_symmetry_space_group_name_H-M 'R -3 mx'",  # misspelt
])
def test_cif_naming_a_space_group_pymatgen_cannot_apply_is_rejected(symmetry: str) -> None:
    """Read as P1, the three listed sites of R-3m LiCoO2 would be screened as a 3-atom cell."""
    reject = parse_raw(_row("cif", asymmetric_unit_cif(symmetry)))
    assert isinstance(reject, Reject) and reject.reason == RejectCode.UNPARSEABLE
    assert "names space group" in reject.message and "asymmetric unit" in reject.message
    assert symmetry.split(None, 1)[1].strip("'") in reject.message


@pytest.mark.parametrize("symmetry, n_sites", [
    ("_symmetry_space_group_name_H-M 'R -3 m'", 12),
    ("_space_group_name_H-M_alt 'R -3 m :H'", 12),  # pymatgen reads no setting suffix
    ("_space_group_name_Hall '-R 3 2\"'", 12),  # nor Hall symbols
    ("_space_group_IT_number 166", 12),
    ("_symmetry_space_group_name_H-M 'R -3 mx'\n_space_group_IT_number 166", 12),  # number used
    ("_symmetry_space_group_name_H-M 'P 1'", 3),
    ("", 3),  # no symmetry given: P1, as CIF has it
])
def test_cif_symmetry_from_a_symbol_or_number_expands_the_cell(symmetry: str, n_sites: int) -> None:
    s = parse_raw(_row("cif", asymmetric_unit_cif(symmetry)))
    assert isinstance(s, Structure), s
    assert len(s) == n_sites and s.composition.reduced_formula == ("LiCoO2" if n_sites == 12 else "LiCoO")


@pytest.mark.parametrize("formula, ok", [
    ("'Li Co O2'", True), ("'Li3 Co3 O6'", True), ("LiCoO2", True),
    ("'H Li Co O2'", False),  # hydrogens the sites leave out
    ("'Li2 Co O2'", False),
    ("'Li+ Co3+ O2-'", True),  # a formula pymatgen cannot read is no evidence either way
])
def test_cif_sites_must_agree_with_the_cifs_formula(formula: str, ok: bool) -> None:
    text = asymmetric_unit_cif(f"_symmetry_space_group_name_H-M 'R -3 m'\n_chemical_formula_sum {formula}")
    parsed = parse_raw(_row("cif", text))
    if ok:
        assert isinstance(parsed, Structure) and parsed.composition.reduced_formula == "LiCoO2", parsed
    else:
        assert isinstance(parsed, Reject) and parsed.reason == RejectCode.UNPARSEABLE
        assert "atom sites give LiCoO2" in parsed.message and formula.strip("'") in parsed.message


def test_cif_written_from_a_loosely_symmetrised_structure_is_caught(shared_data) -> None:
    """CifWriter(symprec=0.1) of MP's mp-1101736 (LiFe3O4) reads back as LiFe3O8: sites that the
    loose symmetry maps close to, not onto, each other are all kept. pymatgen's formula check sees it."""
    import gzip

    from pymatgen.io.cif import CifWriter

    with gzip.open(shared_data / "mp_litmo_summary.jsonl.gz", "rt") as fh:
        doc = next(d for d in map(json.loads, fh) if d["material_id"] == "mp-1101736")
    s = Structure.from_dict(doc["structure"])
    assert isinstance(parse_raw(_row("cif", str(CifWriter(s)))), Structure)
    reject = parse_raw(_row("cif", str(CifWriter(s, symprec=0.1))))
    assert isinstance(reject, Reject) and "atom sites give LiFe3O8" in reject.message


@pytest.mark.parametrize("comment, first", [
    ("Li Co O", "Li"), ("Li3 Co3 O6", "Li"), ("Li Co O2", "Li"),
    ("Co Li O", "Co"),  # the comment line's order is the counts' order, as VASP 4 has it
])
def test_vasp4_poscar_takes_species_from_its_comment_line(comment: str, first: str) -> None:
    s = parse_raw(_row("poscar", vasp4_poscar(licoo2(), comment=comment)))
    assert isinstance(s, Structure), s
    assert s.composition == licoo2().composition  # Li3 Co3 O6 either way
    assert s[0].specie.symbol == first and s.lattice == licoo2().lattice


@pytest.mark.parametrize("comment", ["relaxed cell", "Li Co", "Li2 Co O", "Li Co O x", ""])
def test_vasp4_poscar_without_element_names_is_rejected_not_guessed(comment: str) -> None:
    """pymatgen would call the species H, He, Li: a wrong structure, and out of scope for a wrong reason."""
    reject = parse_raw(_row("poscar", vasp4_poscar(licoo2(), comment=comment)))
    assert isinstance(reject, Reject) and reject.reason == RejectCode.UNPARSEABLE
    assert "POSCAR names no elements" in reject.message and "species line" in reject.message


def test_structure_dict_with_lattice_parameters_instead_of_a_matrix() -> None:
    """pymatgen's Lattice.from_dict takes a, b, c, alpha, beta, gamma when there is no matrix."""
    d = licoo2().as_dict()
    d["lattice"] = {k: d["lattice"][k] for k in ("a", "b", "c", "alpha", "beta", "gamma")}
    s = parse_raw(_row("pymatgen_json", json.dumps(d)))
    assert isinstance(s, Structure)
    assert s.lattice.abc == pytest.approx(licoo2().lattice.abc) and s.volume == pytest.approx(licoo2().volume)
    assert s.composition == licoo2().composition
    del d["lattice"]["gamma"]
    reject = parse_raw(_row("pymatgen_json", json.dumps(d)))
    assert isinstance(reject, Reject) and "not a pymatgen Structure dict" in reject.message


def test_structure_dict_of_a_slab_is_rejected_not_made_bulk() -> None:
    d = licoo2().as_dict()
    assert d["lattice"]["pbc"] == (True, True, True)  # pymatgen writes it
    assert isinstance(parse_raw(_row("pymatgen_json", json.dumps(d))), Structure)
    d["lattice"]["pbc"] = [True, True, False]
    reject = parse_raw(_row("pymatgen_json", json.dumps(d)))
    assert isinstance(reject, Reject) and reject.reason == RejectCode.DEGENERATE_LATTICE
    assert "[True, True, False]" in reject.message and "bulk" in reject.message


@pytest.mark.parametrize("counts, message", [
    ("3 3 5", "counts add up to 11 atoms but more coordinate lines follow"),  # an O added by hand
    ("3 3 7", "counts add up to 13 atoms but it has 12 coordinate lines"),
])
def test_poscar_counts_that_disagree_with_its_coordinate_lines(counts: str, message: str) -> None:
    """pymatgen reads as many lines as the counts say: one too few would drop an atom silently."""
    from pymatgen.io.vasp import Poscar

    for poscar in (Poscar(licoo2()), Poscar(licoo2(), selective_dynamics=[[True, True, False]] * 12)):
        reject = parse_raw(_row("poscar", poscar.get_str().replace("\n3 3 6\n", f"\n{counts}\n")))
        assert isinstance(reject, Reject) and message in reject.message and "fix the counts" in reject.message
    reject = parse_raw(_row("poscar", vasp4_poscar(licoo2(), comment="Li Co O").replace("\n3 3 6\n", f"\n{counts}\n")))
    assert isinstance(reject, Reject) and message in reject.message


def test_poscar_with_velocities_or_a_trailing_comment_keeps_all_its_atoms() -> None:
    from pymatgen.io.vasp import Poscar

    for text in (Poscar(licoo2(), velocities=[[0.1, 0.0, 0.0]] * 12).get_str(),
                 Poscar(licoo2()).get_str().rstrip() + "\n# relaxed with PBE+U\n",
                 Poscar(licoo2()).get_str(direct=False)):
        s = parse_raw(_row("poscar", text))
        assert isinstance(s, Structure) and s.composition == licoo2().composition, s


def test_cif_with_cartesian_coordinates_only_says_so() -> None:
    text = asymmetric_unit_cif("_symmetry_space_group_name_H-M 'R -3 m'").replace("_fract_", "_Cartn_")
    reject = parse_raw(_row("cif", text))
    assert isinstance(reject, Reject) and reject.reason == RejectCode.UNPARSEABLE
    assert "only Cartesian coordinates" in reject.message and "fractional" in reject.message


def _axis_scaled_poscar(direct: bool, scales: tuple[float, float, float]) -> str:
    """LiCoO2's POSCAR written with three scaling factors (VASP 6): lattice vectors (and Cartesian
    positions) divided per axis so that applying the factors gives LiCoO2 back."""
    from pymatgen.io.vasp import Poscar

    lines = Poscar(licoo2()).get_str(direct=direct).split("\n")
    divided = [*range(2, 5), *(() if direct else range(8, 20))]  # lattice lines; 12 Cartesian sites
    for i in divided:
        lines[i] = " ".join(f"{float(x) / f!r}" for x, f in zip(lines[i].split()[:3], scales, strict=True))
    lines[1] = " ".join(map(str, scales))
    return "\n".join(lines)


@pytest.mark.parametrize("direct", [True, False])
def test_poscar_with_three_scaling_factors_applies_one_per_axis(direct: bool) -> None:
    """pymatgen reads only one scaling factor; VASP 6 and ASE take three (one per Cartesian axis)."""
    from ase.io import read
    from pymatgen.io.ase import AseAtomsAdaptor

    text = _axis_scaled_poscar(direct, (2.0, 1.0, 0.5))
    s = parse_raw(_row("poscar", text))
    assert isinstance(s, Structure), s
    assert s.lattice.matrix == pytest.approx(licoo2().lattice.matrix, abs=1e-9)
    assert s.cart_coords == pytest.approx(licoo2().cart_coords, abs=1e-9)
    ase = AseAtomsAdaptor.get_structure(read(io.StringIO(text), format="vasp"))  # an independent reader
    assert s.lattice.matrix == pytest.approx(ase.lattice.matrix, abs=1e-9)
    assert s.cart_coords == pytest.approx(ase.cart_coords, abs=1e-9)


@pytest.mark.parametrize("scale", ["1 -1 1", "1 0 1"])
def test_poscar_with_a_non_positive_axis_scaling_factor_is_rejected(scale: str) -> None:
    text = _axis_scaled_poscar(True, (1.0, 1.0, 1.0)).replace("\n1.0 1.0 1.0\n", f"\n{scale}\n")
    reject = parse_raw(_row("poscar", text))
    assert isinstance(reject, Reject) and reject.reason == RejectCode.UNPARSEABLE
    assert "three scaling factors must all be positive" in reject.message


def _res(latt: str = "-1", occupancy: str = "1.0", o_label: str = "O", o_index: int = 3) -> str:
    """LiCoO2 (R-3m, hexagonal cell, 12 sites) as a .res block."""
    from pymatgen.io.res import ResIO

    lines = ResIO.structure_to_str(licoo2()).splitlines()
    out = []
    for line in lines:
        fields = line.split()
        if fields and fields[0] == "LATT":
            line = f"LATT {latt}"
        elif len(fields) == 6 and fields[0] == "Li":
            line = " ".join([*fields[:5], occupancy])
        elif len(fields) == 6 and fields[0] == "O":
            line = " ".join([o_label, str(o_index), *fields[2:]])
        out.append(line)
    return "\n".join(out) + "\n"


def test_res_is_read_with_shelx_rules_where_pymatgen_is_silent() -> None:
    ok = parse_raw(_row("res", _res()))
    assert isinstance(ok, Structure) and ok.composition.reduced_formula == "LiCoO2" and len(ok) == 12
    numbered = parse_raw(_row("res", _res(o_label="O1")))  # SHELX labels; pymatgen made them O+
    assert isinstance(numbered, Structure) and numbered.composition.reduced_formula == "LiCoO2"
    assert all(not hasattr(sp, "oxi_state") or sp.oxi_state in (None, 0)
               for sp in numbered.composition)
    upper = parse_raw(_row("res", _res(o_label="OS1")))  # upper case: O (or Os), SFAC says O
    assert isinstance(upper, Structure) and upper.composition.reduced_formula == "LiCoO2"
    fixed = parse_raw(_row("res", _res(occupancy="11.0")))  # SHELX: 10 + 1.0, fixed at 1
    assert isinstance(fixed, Structure) and fixed.is_ordered
    half = parse_raw(_row("res", _res(occupancy="0.5")))
    assert isinstance(half, Structure) and not half.is_ordered  # validation's partial_occupancy
    for bad, words in ((_res(latt="3"), "LATT 3"), (_res(latt="1"), "LATT 1"),
                       (_res(o_index=2), "names O but its SFAC index 2 is Co"),
                       (_res(o_label="Os1"), "names Os but its SFAC index 3 is O"),
                       (_res(o_label="CO1"), "names Co or C but its SFAC index 3 is O"),
                       (_res(o_index=7), "SFAC index 7"), (_res(occupancy="21.0"), "free variable")):
        reject = parse_raw(_row("res", bad))
        assert isinstance(reject, Reject) and reject.reason == RejectCode.UNPARSEABLE, bad
        assert words in reject.message, reject.message


def _label_only_cif(o_label: str) -> str:
    rows = "".join(f"{ {'Li': 'Li', 'Co': 'Co'}.get(site.species_string, o_label)}{i} "
                   f"{site.frac_coords[0]:.6f} {site.frac_coords[1]:.6f} {site.frac_coords[2]:.6f}\n"
                   for i, site in enumerate(licoo2()))
    a, _, c = licoo2().lattice.abc
    return (f"data_x\n_symmetry_space_group_name_H-M 'P 1'\n_cell_length_a {a}\n_cell_length_b {a}\n"
            f"_cell_length_c {c}\n_cell_angle_alpha 90\n_cell_angle_beta 90\n_cell_angle_gamma 120\n"
            "loop_\n_atom_site_label\n_atom_site_fract_x\n_atom_site_fract_y\n_atom_site_fract_z\n" + rows)


def test_cif_site_whose_label_names_no_element_is_rejected_not_dropped() -> None:
    ok = parse_raw(_row("cif", _label_only_cif("O")))
    assert isinstance(ok, Structure) and len(ok) == 12
    reject = parse_raw(_row("cif", _label_only_cif("OH")))  # pymatgen reads OH... as water: no site
    assert isinstance(reject, Reject) and reject.reason == RejectCode.UNPARSEABLE
    assert "names no element" in reject.message and "6 site(s)" in reject.message


def test_extxyz_frame_whose_count_disagrees_with_its_atom_lines_is_rejected() -> None:
    from ase.io import write
    from pymatgen.io.ase import AseAtomsAdaptor

    buf = io.StringIO()
    write(buf, AseAtomsAdaptor.get_atoms(licoo2()), format="extxyz")
    for count in ("11", "13"):
        reject = parse_raw(_row("extxyz", buf.getvalue().replace("12\n", f"{count}\n", 1)))
        assert isinstance(reject, Reject) and f"says {count} atoms but 12 atom lines" in reject.message


@pytest.mark.parametrize("suffix, counts", [(False, True), (True, True), (True, False), (False, False)])
def test_cif_in_origin_choice_2_is_read_in_that_setting(suffix: bool, counts: bool) -> None:
    """pymatgen applies origin choice 1 of Fd-3m to any CIF without operations; spinel is usually
    written in choice 2, which pymatgen read as Li2MnO4 with overlapping atoms."""
    from pymatgen.analysis.structure_matcher import StructureMatcher

    text = cif_without_operations(limn2o4(), origin=2, suffix=suffix, counts=counts)
    assert "equiv_pos" not in text and ("F d -3 m :2" in text) == suffix
    parsed = parse_raw(_row("cif", text))
    assert isinstance(parsed, Structure), parsed
    assert len(parsed) == 56 and StructureMatcher().fit(parsed, limn2o4())


def test_cif_origin_choice_neither_counts_nor_overlaps_can_settle_is_rejected() -> None:
    """I4_1/amd LiFeO2 in origin choice 1: without its formula, Z and multiplicities, origin choice 2
    also gives a plausible (doubled) cell, so the file is refused, not guessed."""
    from pymatgen.core import Lattice

    lifeo2 = Structure.from_spacegroup("I4_1/amd", Lattice.tetragonal(4.12, 8.75), ["Li", "Fe", "O"],
                                       [[0, 0, 0.5], [0, 0, 0], [0, 0, 0.2325]])
    for origin, suffix, counts in [(1, False, True), (1, True, False), (2, False, True)]:
        parsed = parse_raw(_row("cif", cif_without_operations(lifeo2, origin=origin, suffix=suffix, counts=counts)))
        assert isinstance(parsed, Structure) and len(parsed) == 16, (origin, suffix, counts, parsed)
    reject = parse_raw(_row("cif", cif_without_operations(lifeo2, origin=1, suffix=False, counts=False)))
    assert isinstance(reject, Reject) and reject.reason == RejectCode.UNPARSEABLE
    assert "'I 41/a m d :1' or 'I 41/a m d :2', both give a plausible structure" in reject.message


@pytest.mark.parametrize("formula", ["_chemical_formula_sum 'Li Co O2'\n", ""])
def test_cif_on_rhombohedral_axes_is_read_on_them(formula: str) -> None:
    """R-3m LiCoO2 as its 4-atom rhombohedral cell: pymatgen applied the hexagonal operations."""
    from pymatgen.analysis.structure_matcher import StructureMatcher

    text = (f"data_LiCoO2\n{formula}_symmetry_space_group_name_H-M 'R -3 m'\n_cell_length_a 4.957\n"
            "_cell_length_b 4.957\n_cell_length_c 4.957\n_cell_angle_alpha 33.0\n_cell_angle_beta 33.0\n"
            "_cell_angle_gamma 33.0\nloop_\n_atom_site_label\n_atom_site_type_symbol\n_atom_site_fract_x\n"
            "_atom_site_fract_y\n_atom_site_fract_z\nLi1 Li 0.5 0.5 0.5\nCo1 Co 0 0 0\nO1 O 0.2396 0.2396 0.2396\n")
    parsed = parse_raw(_row("cif", text))
    assert isinstance(parsed, Structure), parsed
    hexagonal = parse_raw(_row("cif", asymmetric_unit_cif("_symmetry_space_group_name_H-M 'R -3 m'")))
    assert len(parsed) == 4 and StructureMatcher().fit(parsed, hexagonal)


def test_snapshot_materials_in_origin_choice_2_are_read_as_themselves(shared_data) -> None:
    """Every snapshot material whose group has two origin choices, written in choice 2 without
    operations, is read back as itself (they were rejected or misread before)."""
    import gzip
    import re

    from pymatgen.analysis.structure_matcher import StructureMatcher
    from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

    from cathode_ray.data import cifsym

    two_origins = {name for name, settings in cifsym._tables()[0].items() if settings[0].choice == "1"}
    with gzip.open(shared_data / "mp_litmo_summary.jsonl.gz", "rt") as f:
        structures = [Structure.from_dict(json.loads(line)["structure"]) for line in f]
    chosen = [s for s in structures if re.sub(r"[\s_]", "", SpacegroupAnalyzer(
        s, symprec=0.01).get_space_group_symbol()) in two_origins][:8]
    assert len(chosen) == 8
    for structure in chosen:
        parsed = parse_raw(_row("cif", cif_without_operations(structure, origin=2, suffix=False)))
        assert isinstance(parsed, Structure) and StructureMatcher().fit(parsed, structure), parsed


def test_poscar_species_line_must_match_its_counts_and_atom_labels() -> None:
    """pymatgen pairs species names with counts in order: an extra name relabelled the oxygens."""
    from pymatgen.io.vasp import Poscar

    text = Poscar(licoo2()).get_str()  # "Li Co O" over "3 3 6", each atom labelled after its coords
    lines = text.split("\n")
    assert lines[5].split() == ["Li", "Co", "O"]
    assert isinstance(parse_raw(_row("poscar", text)), Structure)
    potcar_names = "\n".join([*lines[:5], "Li_sv Co_pv/1a2b O", *lines[6:]])
    assert parse_raw(_row("poscar", potcar_names)).composition == licoo2().composition
    extra = "\n".join([*lines[:5], "Li Co Ni O", *lines[6:]])
    reject = parse_raw(_row("poscar", extra))
    assert isinstance(reject, Reject) and reject.reason == RejectCode.UNPARSEABLE
    assert "names 4 elements (Li Co Ni O) but its counts line has 3 counts" in reject.message
    swapped = "\n".join([*lines[:5], "Li O Co", *lines[6:]])  # the labels still say Li, Co, O
    reject = parse_raw(_row("poscar", swapped))
    assert isinstance(reject, Reject) and "is labelled Co after its coordinates" in reject.message
    selective = Poscar(licoo2(), selective_dynamics=[[True, True, False]] * len(licoo2())).get_str()
    assert parse_raw(_row("poscar", selective)).composition == licoo2().composition  # "T T F Li"


def test_cif_vacancy_and_non_element_type_symbols_are_rejected() -> None:
    """pymatgen read a 'Vac' site as vanadium, and 'Lix' as Li, without a word."""
    from pymatgen.io.cif import CifWriter

    text = str(CifWriter(licoo2()))
    assert isinstance(parse_raw(_row("cif", text)), Structure)
    li_row = next(line for line in text.split("\n") if line.split()[:1] == ["Li"])
    for symbol, words in (("Vac", "is a vacancy"), ("Va", "is a vacancy"),
                          ("Lix", "is not an element"), ("X", "is not an element")):
        changed = text.replace(li_row, li_row.replace("Li", symbol, 2), 1)
        reject = parse_raw(_row("cif", changed))
        assert isinstance(reject, Reject) and reject.reason == RejectCode.UNPARSEABLE, symbol
        assert words in reject.message, reject.message
    charged = text.replace(li_row, li_row.replace("Li ", "Li+ ", 1), 1)
    assert parse_raw(_row("cif", charged)).composition == licoo2().composition
