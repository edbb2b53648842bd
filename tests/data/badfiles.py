"""Generators of a bad-input corpus and of good libraries in every supported format.

``write_bad_library(dir)`` writes files that each yield exactly one raw row that must be rejected
with a known code (default ValidationConfig, files read in sorted order: ``zz_duplicate_id.json``
re-uses the id of ``no_li.json``). ``write_good_library(dir)`` writes files whose structures all
pass validation. Importable by any test: ``from tests.data.badfiles import write_bad_library``.
"""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from pymatgen.core import Lattice, Structure
from pymatgen.io.cif import CifWriter
from pymatgen.io.vasp import Poscar

from cathode_ray.data.demo import prototype_cells
from cathode_ray.data.records import RejectCode

SHARED_ID = "bad-shared-id"


def licoo2() -> Structure:
    """12-atom layered LiCoO2 (hexagonal cell), valid under the default ValidationConfig."""
    return prototype_cells("layered")[0].copy()


def limn2o4() -> Structure:
    """14-atom primitive spinel LiMn2O4."""
    s = prototype_cells("spinel")[0].copy()
    s.replace_species({"Co": "Mn"})
    return s


def lifepo4() -> Structure:
    """28-atom olivine LiFePO4."""
    s = prototype_cells("olivine")[0].copy()
    s.replace_species({"Co": "Fe"})
    return s


def _swap(structure: Structure, old: str, new: str) -> Structure:
    s = structure.copy()
    s.replace_species({old: new})
    return s


def _dump(path: Path, obj: object) -> None:
    path.write_text(json.dumps(obj))


def _item(structure: Structure, structure_id: str | None = None, **labels: object) -> dict:
    item: dict = {"structure": structure.as_dict(), **labels}
    if structure_id is not None:
        item["structure_id"] = structure_id
    return item


def write_bad_library(directory: str | Path) -> dict[str, RejectCode]:
    """Write the bad-input corpus into ``directory``; return ``{file name: expected RejectCode}``."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    base = licoo2()
    expected: dict[str, RejectCode] = {}

    (d / "malformed.cif").write_text("data_broken\n_cell_length_a 3.0\nthis is not a cif loop\n")
    expected["malformed.cif"] = RejectCode.UNPARSEABLE

    disordered = base.copy()
    cobalt = next(i for i, site in enumerate(disordered) if site.specie.symbol == "Co")
    disordered.replace(cobalt, {"Co": 0.5, "Ni": 0.5})
    CifWriter(disordered).write_file(d / "partial_occupancy.cif")
    expected["partial_occupancy.cif"] = RejectCode.PARTIAL_OCCUPANCY

    americium = base.copy()
    americium.replace(0, "Am")  # Z = 95, beyond what CHGNet / MACE-MP cover
    _dump(d / "unsupported_element.json", americium.as_dict())
    expected["unsupported_element.json"] = RejectCode.UNSUPPORTED_ELEMENT

    lonely = Structure(
        Lattice.cubic(30.0), ["Li", "Co", "O", "O", "O"],
        [[0, 0, 0], [1.9, 0, 0], [3.8, 0, 0], [1.9, 1.9, 0], [15.0, 15.0, 15.0]],
        coords_are_cartesian=True,
    )
    _dump(d / "isolated_atom.json", lonely.as_dict())
    expected["isolated_atom.json"] = RejectCode.ISOLATED_ATOM

    flat = base.as_dict()
    flat["lattice"]["matrix"] = [[2.8, 0.0, 0.0], [0.0, 2.8, 0.0], [2.8, 2.8, 0.0]]  # coplanar
    _dump(d / "zero_volume.json", flat)
    expected["zero_volume.json"] = RejectCode.DEGENERATE_LATTICE

    # pymatgen's POSCAR writer makes lattices right-handed, so flip c in the text itself
    lines = Poscar(base).get_str().splitlines()
    lines[4] = " ".join(f"{-x:.10f}" for x in base.lattice.matrix[2])
    (d / "negative_volume.vasp").write_text("\n".join(lines) + "\n")
    expected["negative_volume.vasp"] = RejectCode.DEGENERATE_LATTICE

    nan = base.as_dict()
    nan["sites"][3]["abc"] = [math.nan, 0.1, 0.2]
    nan["sites"][3].pop("xyz", None)
    (d / "nan_coordinates.json").write_text(json.dumps(nan))  # Python json writes NaN
    expected["nan_coordinates.json"] = RejectCode.NON_FINITE_COORDINATES

    big = base.make_supercell((7, 7, 1), in_place=False)  # 588 sites > MAX_ATOMS = 500
    _dump(d / "too_many_atoms.json", big.as_dict())
    expected["too_many_atoms.json"] = RejectCode.TOO_MANY_ATOMS

    crowded = base.copy()
    crowded.append("O", crowded[-1].coords + [0.2, 0.0, 0.0], coords_are_cartesian=True)
    CifWriter(crowded).write_file(d / "overlapping_atoms.cif")
    expected["overlapping_atoms.cif"] = RejectCode.OVERLAPPING_ATOMS

    (d / "empty.cif").write_text("")
    expected["empty.cif"] = RejectCode.EMPTY_SOURCE

    _dump(d / "no_li.json", _item(_swap(base, "Li", "Na"), SHARED_ID))
    expected["no_li.json"] = RejectCode.OUT_OF_SCOPE
    _dump(d / "no_o.json", _swap(base, "O", "S").as_dict())
    expected["no_o.json"] = RejectCode.OUT_OF_SCOPE
    _dump(d / "no_tm.json", _swap(base, "Co", "Al").as_dict())
    expected["no_tm.json"] = RejectCode.OUT_OF_SCOPE

    (d / "corrupt.parquet").write_bytes(b"PAR1" + bytes(range(256)) * 4 + b"PAR1")
    expected["corrupt.parquet"] = RejectCode.UNREADABLE_FILE

    whole = gzip.compress(str(CifWriter(base)).encode("utf-8"))
    (d / "truncated.cif.gz").write_bytes(whole[: len(whole) // 2])
    expected["truncated.cif.gz"] = RejectCode.UNREADABLE_FILE

    # a CIF file may hold several structures (one row each), but one Parquet cell holds one
    pq.write_table(pa.table({"structure_id": ["two-in-one"], "cif": [two_structure_cif()]}),
                   d / "two_structures_in_one_cell.parquet")
    expected["two_structures_in_one_cell.parquet"] = RejectCode.MULTIPLE_STRUCTURES

    (d / "asymmetric_unit_only.cif").write_text(asymmetric_unit_cif("_space_group_name_Hall '-R 3 9'"))
    expected["asymmetric_unit_only.cif"] = RejectCode.UNPARSEABLE  # no such Hall symbol
    (d / "formula_mismatch.cif").write_text(
        asymmetric_unit_cif("_symmetry_space_group_name_H-M 'R -3 m'\n_chemical_formula_sum 'H Li Co O2'"))
    expected["formula_mismatch.cif"] = RejectCode.UNPARSEABLE  # hydrogens not placed
    (d / "no_element_names.vasp").write_text(vasp4_poscar(base, comment="relaxed cell"))
    expected["no_element_names.vasp"] = RejectCode.UNPARSEABLE
    (d / "atom_not_counted.vasp").write_text(Poscar(base).get_str().replace("\n3 3 6\n", "\n3 3 5\n"))
    expected["atom_not_counted.vasp"] = RejectCode.UNPARSEABLE  # pymatgen would drop the last O

    _dump(d / "zz_duplicate_id.json", _item(base, SHARED_ID))
    expected["zz_duplicate_id.json"] = RejectCode.DUPLICATE_ID
    return expected


def asymmetric_unit_cif(symmetry: str) -> str:
    """LiCoO2 (R-3m, a = 2.816, c = 14.05 A) as a CIF of its three-site asymmetric unit, with
    ``symmetry`` (CIF lines naming the space group) and no symmetry-operation loop."""
    return (f"data_LiCoO2\n{symmetry}\n_cell_length_a 2.816\n_cell_length_b 2.816\n_cell_length_c 14.05\n"
            "_cell_angle_alpha 90\n_cell_angle_beta 90\n_cell_angle_gamma 120\nloop_\n_atom_site_label\n"
            "_atom_site_type_symbol\n_atom_site_fract_x\n_atom_site_fract_y\n_atom_site_fract_z\n"
            "_atom_site_occupancy\nLi1 Li 0 0 0.5 1\nCo1 Co 0 0 0 1\nO1 O 0 0 0.2396 1\n")


def vasp4_poscar(structure: Structure, *, comment: str) -> str:
    """``structure`` as a VASP 4 POSCAR: no species line, no symbols after the coordinates, and
    ``comment`` as the first line (where VASP 4 users conventionally name the species)."""
    lines = Poscar(structure).get_str().splitlines()  # comment, scale, 3 vectors, species, counts, ...
    sites = [line.rsplit(None, 1)[0] for line in lines[8:] if line.strip()]  # without their symbols
    return "\n".join([comment, *lines[1:5], *lines[6:8], *sites]) + "\n"


def write_good_library(directory: str | Path) -> dict[str, int]:
    """Write valid structures in every supported format; return ``{relative path: n structures}``."""
    from ase.io import write as ase_write
    from pymatgen.io.ase import AseAtomsAdaptor

    d = Path(directory)
    (d / "mp-good").mkdir(parents=True, exist_ok=True)
    a, b, c = licoo2(), limn2o4(), lifepo4()
    counts: dict[str, int] = {}

    CifWriter(a).write_file(d / "LiCoO2.cif")
    counts["LiCoO2.cif"] = 1
    (d / "LiFePO4.cif.gz").write_bytes(gzip.compress(str(CifWriter(c)).encode("utf-8")))
    counts["LiFePO4.cif.gz"] = 1
    (d / "LiMn2O4.vasp").write_text(Poscar(b).get_str())
    counts["LiMn2O4.vasp"] = 1
    (d / "mp-good" / "POSCAR").write_text(Poscar(c).get_str())
    counts["mp-good/POSCAR"] = 1
    (d / "LiCoO2_POSCAR").write_text(vasp4_poscar(a, comment="Li Co O"))  # VASP 4, names in the comment
    counts["LiCoO2_POSCAR"] = 1
    ase_write(d / "frames.extxyz", [AseAtomsAdaptor.get_atoms(s) for s in (a, b)], format="extxyz")
    counts["frames.extxyz"] = 2
    _dump(d / "single.json", c.as_dict())
    counts["single.json"] = 1
    _dump(d / "list.json", [_item(a, "list-a", energy_above_hull=0.0),
                            _item(b, "list-b", energy_above_hull=0.012)])
    counts["list.json"] = 2
    docs = [
        {"material_id": f"mp-doc-{i}", "formula_pretty": s.composition.reduced_formula,
         "energy_above_hull": 0.01 * i, "structure": s.as_dict()}
        for i, s in enumerate((a, b, c))
    ]
    (d / "docs.jsonl.gz").write_bytes(gzip.compress("\n".join(map(json.dumps, docs)).encode()))
    counts["docs.jsonl.gz"] = 3
    pq.write_table(
        pa.table({"structure_id": ["cif-a", "cif-c"], "cif": [str(CifWriter(a)), str(CifWriter(c))],
                  "energy_above_hull": [0.0, 0.05]}),
        d / "cif_column.parquet",
    )
    counts["cif_column.parquet"] = 2
    pq.write_table(pa.table({"structure_json": [s.to_json() for s in (a, b, c)]}),
                   d / "json_column.parquet")
    counts["json_column.parquet"] = 3
    (d / "two_blocks.cif").write_text(two_structure_cif())
    counts["two_blocks.cif"] = 2
    # a journal's CIF: a metadata-only data_global block, Latin-1 text, Windows line ends
    journal = ("data_global\n_journal_name_full 'Acta Cryst. E'\n_publ_author_name 'M\u00fcller, J.'\n"
               + _cif_block(c, "I"))
    (d / "journal.cif").write_bytes(journal.replace("\n", "\r\n").encode("latin-1"))
    counts["journal.cif"] = 1
    (d / "bom.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(a.as_dict()).encode())  # Windows
    counts["bom.json"] = 1
    (d / "utf16.vasp").write_text(Poscar(b).get_str(), encoding="utf-16")  # Windows' "Unicode"
    counts["utf16.vasp"] = 1
    (d / "airss.res").write_text(airss_res(a, "LiCoO2-8f2a-1") + airss_res(c, "LiFePO4-03b1-7"))
    counts["airss.res"] = 2
    atoms = [AseAtomsAdaptor.get_atoms(s) for s in (a, b, c)]
    ase_write(d / "relax.traj", atoms[:2], format="traj")
    counts["relax.traj"] = 2
    write_ase_db(d / "candidates.db", [(atoms[1], {"material_id": "ase-b", "energy_above_hull": 0.02}),
                                       (atoms[2], {})])
    counts["candidates.db"] = 2
    (d / "relax-1").mkdir(exist_ok=True)  # a VASP relaxation's output, gzipped as archived
    (d / "relax-1" / "vasprun.xml.gz").write_bytes(gzip.compress(vasprun_xml(relaxation(b)).encode()))
    counts["relax-1/vasprun.xml.gz"] = 1
    (d / "README.txt").write_text("not a structure file; library listing skips it\n")
    (d / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0 Windows Explorer thumbnail cache")
    return counts


def airss_res(structure: Structure, title: str) -> str:
    """A ``.res`` block as AIRSS writes it: a ``TITL`` line with the run's name, pressure, volume
    and enthalpy, a ``REM`` line, cell, species and sites, ``END``."""
    from pymatgen.io.res import ResIO

    body = ResIO.structure_to_str(structure).split("\n", 1)[1]  # pymatgen's TITL line is bare
    return (f"TITL {title} 0.00 {structure.volume:.3f} -1234.5678 0 0 {len(structure)} (P1) n - 1\n"
            f"REM Generated by buildcell\n{body.rstrip()}\n")


def relaxation(structure: Structure) -> list[Structure]:
    """Three ionic steps from ``structure``: a 2 % then 3 % larger cell (the last is the result)."""
    steps = [structure.copy()]
    for scale in (1.02, 1.03):
        step = structure.copy()
        step.scale_lattice(structure.volume * scale**3)
        steps.append(step)
    return steps


def vasprun_xml(steps: list[Structure], *, energy_per_atom: float = -5.0) -> str:
    """A ``vasprun.xml`` of a relaxation through ``steps`` (one ionic step each; all the same
    species order), laid out as VASP writes it: ``atominfo``, ``initialpos``, one ``calculation``
    per ionic step (structure, forces, energies) and ``finalpos``. Cut it to fake a killed run."""

    def vectors(name: str, rows: object) -> str:
        return (f'  <varray name="{name}">\n'
                + "".join(f"   <v> {' '.join(f'{x:16.8f}' for x in row)} </v>\n" for row in rows)
                + "  </varray>\n")

    def structure(s: Structure, name: str | None) -> str:
        attr = f' name="{name}"' if name else ""
        return (f" <structure{attr}>\n  <crystal>\n" + vectors("basis", s.lattice.matrix)
                + f'   <i name="volume"> {s.volume:.8f} </i>\n  </crystal>\n'
                + vectors("positions", s.frac_coords) + " </structure>\n")

    first, n = steps[0], len(steps[0])
    symbols = [site.specie.symbol for site in first]
    types = list(dict.fromkeys(symbols))
    atoms = "".join(f"    <rc><c>{e:2s}</c><c>{types.index(e) + 1:4d}</c></rc>\n" for e in symbols)
    head = ('<?xml version="1.0" encoding="ISO-8859-1"?>\n<modeling>\n <generator>\n'
            '  <i name="program" type="string">vasp </i>\n  <i name="version" type="string">6.4.2 '
            '</i>\n </generator>\n <incar>\n  <i type="string" name="SYSTEM">relax</i>\n'
            '  <i name="IBRION" type="int">2</i>\n </incar>\n <atominfo>\n'
            f'  <atoms> {n} </atoms>\n  <types> {len(types)} </types>\n  <array name="atoms">\n'
            '   <dimension dim="1">ion</dimension>\n   <field type="string">element</field>\n'
            f'   <field type="int">atomtype</field>\n   <set>\n{atoms}   </set>\n  </array>\n'
            " </atominfo>\n <kpoints>\n  <generation param=\"Gamma\">\n"
            '   <v type="int" name="divisions"> 2 2 2 </v>\n  </generation>\n'
            + vectors("kpointlist", [[0.0, 0.0, 0.0]]) + vectors("weights", [[1.0]])
            + " </kpoints>\n" + structure(first, "initialpos"))
    calcs = []
    for i, s in enumerate(steps):
        e = (energy_per_atom - 0.01 * i) * n
        energy = (f'   <i name="e_fr_energy"> {e:.8f} </i>\n   <i name="e_wo_entrp"> {e:.8f} </i>\n'
                  f'   <i name="e_0_energy"> {e:.8f} </i>\n')
        calcs.append(f" <calculation>\n  <scstep>\n   <energy>\n{energy}   </energy>\n  </scstep>\n"
                     + structure(s, None) + vectors("forces", [[0.01, 0.0, -0.01]] * n)
                     + f"  <energy>\n{energy}  </energy>\n </calculation>\n")
    return head + "".join(calcs) + structure(steps[-1], "finalpos") + "</modeling>\n"


def write_ase_db(path: str | Path, rows: list[tuple[object, dict]]) -> None:
    """An ASE SQLite database with one row per (ase.Atoms, key-value pairs)."""
    import ase.db

    with ase.db.connect(str(path), type="db", append=False) as db:
        for atoms, keys in rows:
            db.write(atoms, **keys)


def _cif_block(structure: Structure, name: str) -> str:
    """CifWriter's text for ``structure`` from its ``data_`` line on, the block renamed ``name``."""
    text = str(CifWriter(structure))
    start = text.index("data_")
    return f"data_{name}\n" + text[start:].split("\n", 1)[1]


def two_structure_cif() -> str:
    """One CIF text with two data blocks with atom sites (LiCoO2, LiMn2O4)."""
    return _cif_block(licoo2(), "first") + "\n" + _cif_block(limn2o4(), "second")


def cif_without_operations(structure: Structure, *, origin: int, suffix: bool, counts: bool = True) -> str:
    """``structure`` as a symmetrised CIF with no operations loop, its sites in origin choice
    ``origin`` (1 or 2) of its space group (which must have two), named without (or, with
    ``suffix``, with) the ':1'/':2'. Without ``counts``, the formula, Z and site multiplicities are
    left out too."""
    import re

    import numpy as np

    from cathode_ray.data import cifsym

    text = str(CifWriter(structure, symprec=0.01))
    name = re.search(r"_symmetry_space_group_name_H-M\s+(\S+)", text).group(1)
    first, second = cifsym._tables()[0][re.sub(r"[\s_]", "", name)]  # CifWriter writes choice 1
    shift = _origin_shift(first, second) if origin == 2 else np.zeros(3)
    lines, out, in_symops = text.splitlines(), [], False
    for i, line in enumerate(lines):
        words = line.split()
        in_symops = (in_symops or (line.strip() == "loop_" and "_symmetry_equiv_pos" in lines[i + 1])) and not (
            line.strip() == "loop_" and "_atom_site" in lines[i + 1])
        if in_symops or (not counts and re.match(r"\s*_(chemical_formula|cell_formula_units_Z)", line)):
            continue
        if len(words) == 7 and not line.lstrip().startswith("_"):  # symbol label mult x y z occ
            xyz = (np.array([float(v) for v in words[3:6]]) + shift) % 1.0
            words = words[:3] + [f"{v:.8f}" for v in xyz] + words[6:]
            line = "  " + " ".join(words if counts else words[:2] + words[3:])
        elif not counts and "_atom_site_symmetry_multiplicity" in line:
            continue
        out.append(line)
    text = "\n".join(out) + "\n"
    return text.replace(f"H-M   {name}", f"H-M   '{(first, second)[origin - 1].symbol}'") if suffix else text


def _origin_shift(first: object, second: object) -> object:
    """The shift t (fractional) with x2 = x1 + t taking origin choice 1's operations to choice 2's."""
    import numpy as np
    from pymatgen.core.operations import SymmOp

    def key(rotation: np.ndarray, translation: np.ndarray) -> tuple[bytes, tuple[int, ...]]:
        return np.rint(rotation).astype(int).tobytes(), tuple(np.rint(np.mod(translation, 1) * 24).astype(int) % 24)

    ops = [SymmOp.from_xyz_str(s) for s in first.symops]
    wanted = {key(o.rotation_matrix, o.translation_vector) for o in map(SymmOp.from_xyz_str, second.symops)}
    for t in np.stack(np.meshgrid(*[np.arange(8) / 8] * 3), -1).reshape(-1, 3):
        if {key(o.rotation_matrix, o.translation_vector + t - o.rotation_matrix @ t) for o in ops} == wanted:
            return t
    raise ValueError(f"no origin shift takes {first.symbol} to {second.symbol}")
