"""Parse raw library rows into pymatgen Structures, or Reject rows that say why not.

Readers (:mod:`cathode_ray.data.library`) yield text payloads; this module turns each into a
Structure with pymatgen (CIF, POSCAR, SHELX/AIRSS ``.res``, Structure dicts) or ASE (extended XYZ).
Nothing in a payload is ever executed or unpickled: Structure dicts are rebuilt from plain data
(:func:`structure_from_untrusted_dict`), never through monty's decoder.

Where a file says more than its sites, the parse is checked against it, so that a misread file is
a reject rather than a wrong structure: a CIF naming a space group whose operations pymatgen cannot
build (it would read the asymmetric unit as P1), a CIF whose sites disagree with its own
``_chemical_formula_sum``, a VASP 4 POSCAR that names no elements (pymatgen would call them H, He,
Li, ...; species on the comment line, the VASP 4 convention, are used), and a POSCAR whose counts
disagree with its coordinate lines (pymatgen would drop the atoms beyond the counts), a CIF site whose
symbol names no element (pymatgen skips labels such as ``OH1``), an extended-XYZ frame whose count
disagrees with its atom lines, and a ``.res`` file with SHELX centring (``LATT``), an SFAC index that
disagrees with its label, or a free-variable occupancy (see :func:`_parse_res`). A VASP 6 POSCAR
with three scaling factors (one per Cartesian axis), which pymatgen cannot read, has them applied first,
as VASP and ASE do.
"""

from __future__ import annotations

import io
import json
import math
import re
import warnings
from typing import TYPE_CHECKING, Any

from pymatgen.core import Structure

from cathode_ray import seedcard
from cathode_ray.data import cifsym
from cathode_ray.data.library import FORMATS, cif_structure_blocks
from cathode_ray.data.records import Reject, RejectCode, short_error

if TYPE_CHECKING:
    from pymatgen.io.cif import CifParser


def parse_raw(row: dict[str, Any], *, max_sites: int | None = None) -> Structure | Reject:
    """Parse one raw row into a pymatgen Structure, or a Reject (never raises on bad content).

    Text is parsed with pymatgen (CIF, POSCAR, SHELX .res, Structure.from_dict) or ASE (extended XYZ via
    AseAtomsAdaptor); nothing is executed or unpickled. ``max_sites`` (validation's ``max_atoms``):
    a CIF whose site loop has over ``seedcard.CIF_ROWS_PER_ATOM_CAP`` times as many rows is a
    ``too_many_atoms`` reject before pymatgen spends seconds building it; None: no cap.
    """
    sid, source, fmt = str(row["structure_id"]), str(row["source"]), row.get("fmt", "")
    if fmt == "error":
        return Reject(structure_id=sid, source=source, reason=RejectCode(row["error"]),
                      message=str(row["payload"]))
    parser = _PARSERS.get(fmt)
    if parser is None:
        return Reject(structure_id=sid, source=source, reason=RejectCode.UNPARSEABLE,
                      message=f"unknown raw format {fmt!r}; expected one of {FORMATS}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            payload = str(row["payload"])
            result = _parse_cif(payload, max_sites) if fmt == "cif" else parser(payload)
    except Exception as exc:  # noqa: BLE001 - untrusted input: every parser failure is a reject
        return Reject(structure_id=sid, source=source, reason=RejectCode.UNPARSEABLE,
                      message=f"cannot parse {fmt} ({type(exc).__name__}: {short_error(exc)}); "
                      "check the file with pymatgen/ASE and re-export it")
    if isinstance(result, str):
        code, message = result.split(":", 1)
        return Reject(structure_id=sid, source=source, reason=RejectCode(code), message=message)
    return result


def _parse_cif(text: str, max_sites: int | None = None) -> Structure | str:
    blocks = cif_structure_blocks(text)
    if len(blocks) > 1:
        return (f"{RejectCode.MULTIPLE_STRUCTURES}:CIF holds {len(blocks)} data blocks with atom "
                "sites; give one structure per row")
    if _CIF_CARTESIAN_ONLY.search(text) and not _CIF_FRACTIONAL.search(text):
        return (f"{RejectCode.UNPARSEABLE}:CIF gives only Cartesian coordinates (_atom_site_Cartn_x), which "
                "pymatgen does not read; re-export it with fractional coordinates (_atom_site_fract_x)")
    block = blocks[0] if blocks else text
    parser = _cif_parser(block)
    parsed = next(iter(parser.as_dict().values()), {})  # the block's tags
    if max_sites is not None and (rows := _cif_site_rows(parsed)) > (
            cap := seedcard.CIF_ROWS_PER_ATOM_CAP * max_sites):
        return (f"{RejectCode.TOO_MANY_ATOMS}:CIF site loop has {rows} rows (> {cap}, "
                f"{seedcard.CIF_ROWS_PER_ATOM_CAP} per site of max_atoms={max_sites}), so its cell "
                "has more sites than max_atoms; use the primitive cell or raise max_atoms")
    settings = cifsym.candidate_settings(parsed)
    if settings:
        return _cif_in_settings(block, settings, parsed)
    structure = _read_cif(parser)
    return structure if isinstance(structure, str) else _cif_problem(parser, structure) or structure


def _cif_site_rows(block: dict[str, Any]) -> int:
    """Rows of a parsed CIF block's atom-site loop (0 without one)."""
    column = next((block[tag] for tag in ("_atom_site_fract_x", "_atom_site_label",
                                          "_atom_site_type_symbol") if tag in block), [])
    return len(column) if isinstance(column, list) else 1


def _cif_parser(text: str) -> CifParser:
    """pymatgen's parser of one CIF block (nothing is built until :func:`_read_cif`)."""
    from pymatgen.io.cif import CifParser

    # a site over-full by a database's rounding (1.0001) is scaled to 1; validation fills 0.9999
    return CifParser.from_str(text, occupancy_tolerance=1.0 + seedcard.OCCUPANCY_TOLERANCE)


def _read_cif(parser: CifParser) -> Structure | str:
    """The parser's one structure, or a reject text when the block holds several."""
    structures = parser.parse_structures(primitive=False, on_error="raise")
    if len(structures) != 1:
        return (f"{RejectCode.MULTIPLE_STRUCTURES}:CIF holds {len(structures)} structures; "
                "split it into one file per structure")
    return structures[0]


def _cif_problem(parser: CifParser, structure: Structure) -> str | None:
    """A reject text for what pymatgen read without complaint but is not the file's structure."""
    return (_cif_dropped_site_problem(parser) or _cif_site_symbol_problem(parser)
            or _cif_symmetry_problem(parser) or _cif_composition_problem(parser, structure))


def _cif_in_settings(text: str, settings: tuple[cifsym.Setting, ...], block: dict[str, Any]
                     ) -> Structure | str:
    """The CIF read in the one setting it states, or in the one of two (origin choices) that gives a
    consistent structure: its formula and atom count (:func:`_cif_cell_content_agrees`), and no two
    atoms closer than ``seedcard.MIN_DISTANCE`` (A). A reject text when neither or both do.
    ``block``: the block's tags as pymatgen parsed them (without the added operations)."""
    readings: list[Structure | str] = []
    for setting in settings:
        parser = _cif_parser(text + cifsym.symop_loop(setting))
        try:
            read = _read_cif(parser)
        except Exception as exc:  # noqa: BLE001 - e.g. sites over-full where a wrong origin overlaps them
            read = f"{RejectCode.UNPARSEABLE}:{short_error(exc)}"
        readings.append(read if isinstance(read, str) else _cif_problem(parser, read) or read)
    if len(settings) == 1:
        return readings[0]
    plausible = [(setting, structure) for setting, structure in zip(settings, readings, strict=True)
                 if not isinstance(structure, str) and not _has_overlapping_atoms(structure)
                 and _cif_cell_content_agrees(block, structure)]
    if len(plausible) == 1:
        return plausible[0][1]
    name = settings[0].symbol.rpartition(":")[0].strip()
    choices = " or ".join(f"'{s.symbol}'" for s in settings)
    found = ("both give a plausible structure" if plausible else "neither gives its formula and site "
             f"multiplicities with atoms at least {seedcard.MIN_DISTANCE} A apart")
    return (f"{RejectCode.UNPARSEABLE}:CIF names space group '{name}' without its setting and lists no "
            f"symmetry operations; of its settings {choices}, {found}; name the setting in "
            "_space_group_name_H-M_alt or add a _space_group_symop_operation_xyz loop")


def _cif_cell_content_agrees(block: dict[str, Any], structure: Structure) -> bool:
    """Whether the cell holds as many atoms as the CIF says: the sum of its sites'
    ``_atom_site_symmetry_multiplicity``, or Z times its formula (or the formula itself, as pymatgen
    writes it). True when the CIF says neither; a wrong origin choice often doubles the count."""
    from pymatgen.core import Composition

    multiplicities = block.get("_atom_site_symmetry_multiplicity")
    if isinstance(multiplicities, list) and all(m.isdigit() for m in multiplicities):
        return len(structure) == sum(int(m) for m in multiplicities)
    try:
        formula_atoms = Composition(str(block["_chemical_formula_sum"])).num_atoms
        z = float(block["_cell_formula_units_Z"])
    except (KeyError, ValueError, TypeError):
        return True
    atoms = structure.composition.num_atoms
    return any(math.isclose(atoms, n, rel_tol=1e-2) for n in (z * formula_atoms, formula_atoms))


def _has_overlapping_atoms(structure: Structure) -> bool:
    """Whether two atoms (periodic images included) are closer than ``seedcard.MIN_DISTANCE`` (A)."""
    centres, _, _, _ = structure.get_neighbor_list(r=seedcard.MIN_DISTANCE)
    return len(centres) > 0


_CIF_CARTESIAN_ONLY = re.compile(r"^[ \t]*_atom_site[._]cartn_x\b", re.IGNORECASE | re.MULTILINE)
_CIF_FRACTIONAL = re.compile(r"^[ \t]*_atom_site[._]fract_x\b", re.IGNORECASE | re.MULTILINE)

#: CIF tags that name a space group (pymatgen's spellings; values compared without spaces or '_').
_SPACE_GROUP_TAGS = ("_symmetry_space_group_name_H-M", "_space_group_name_H-M_alt", "_space_group_name_Hall",
                     "_symmetry_space_group_name_Hall", "_space_group_IT_number", "_symmetry_Int_Tables_number")
_P1 = {"P1", "1"}
_NO_VALUE = {"", "?", "."}


#: Atom-site symbols pymatgen's ``CifParser`` reads as no element and skips without an error: labels
#: starting "OH"/"OH2" (taken for water or hydroxyl) and symbols without a letter ("?", "1").
_CIF_SKIPPED_SYMBOL = re.compile(r"^(?:OH|[^A-Za-z]*$)")


def _cif_site_symbols(block: dict[str, Any]) -> tuple[str, list[str]]:
    """(tag, values) of the column pymatgen takes each site's element from: the type symbols,
    else the labels; values stripped."""
    tag = "_atom_site_type_symbol" if block.get("_atom_site_type_symbol") else "_atom_site_label"
    values = block.get(tag) or []
    return tag, [str(v).strip() for v in ([values] if isinstance(values, str) else values)]


def _cif_dropped_site_problem(parser: CifParser) -> str | None:
    """A reject text when pymatgen would skip an atom site because its type symbol (or, without
    ``_atom_site_type_symbol``, its label) names no element: the structure would lack that site."""
    for block in parser.as_dict().values():
        tag, symbols = _cif_site_symbols(block)
        dropped = [s for s in symbols if _CIF_SKIPPED_SYMBOL.match(s)]
        if dropped:
            return (f"{RejectCode.UNPARSEABLE}:CIF atom site {dropped[0]!r} ({tag}, {len(dropped)} site(s)) "
                    "names no element, so pymatgen would leave it out (labels starting 'OH' are read as "
                    "water); add an _atom_site_type_symbol column naming each site's element")
    return None


#: An ``_atom_site_type_symbol`` as the CIF dictionary defines it: an element, then an optional
#: charge (``Co``, ``Co3+``, ``O2-``).
_CIF_TYPE_SYMBOL = re.compile(r"^([A-Za-z]{1,2})(?:\d*[+-]|[+-]\d*)?$")
#: A label that marks a vacancy (ATAT, SQS and CALPHAD exports): pymatgen reads ``Va``/``Vac`` as V.
_CIF_VACANCY_LABEL = re.compile(r"^(?:va|vac)(?![a-z])", re.IGNORECASE)


def _cif_site_symbol_problem(parser: CifParser) -> str | None:
    """A reject text when a site's type symbol is no element (pymatgen reads ``Vac`` as V and
    ``Lix`` as Li without a word), or, without type symbols, its label marks a vacancy."""
    from pymatgen.core.periodic_table import Element

    for block in parser.as_dict().values():
        tag, values = _cif_site_symbols(block)
        types = tag == "_atom_site_type_symbol"
        for value in values:
            if _CIF_VACANCY_LABEL.match(value):
                return (f"{RejectCode.UNPARSEABLE}:CIF atom site {value!r} ({tag}) is a vacancy, which "
                        "pymatgen would read as vanadium; leave vacant sites out of the site loop")
            if types and not ((m := _CIF_TYPE_SYMBOL.match(value))
                              and Element.is_valid_symbol(m.group(1).capitalize())):
                return (f"{RejectCode.UNPARSEABLE}:CIF atom site type symbol {value!r} is not an element "
                        "(with an optional charge, e.g. 'Co3+'), so pymatgen would guess one from its "
                        "first letters; give each site's element in _atom_site_type_symbol")
    return None


def _cif_symmetry_problem(parser: CifParser) -> str | None:
    """A reject text when the CIF names a space group other than P1 but pymatgen fell back to P1:
    it found no symmetry operations and could not build them from the name (a Hall symbol, a
    misspelt Hermann-Mauguin symbol), so only the listed sites, the asymmetric unit, would be read."""
    if not any("Defaulting to P1" in w for w in parser.warnings):
        return None
    for block in parser.as_dict().values():
        for tag in _SPACE_GROUP_TAGS:
            value = str(block.get(tag) or "").strip()
            if value not in _NO_VALUE and value.replace(" ", "").replace("_", "") not in _P1:
                return (f"{RejectCode.UNPARSEABLE}:CIF names space group {value!r} ({tag}) but lists no "
                        "symmetry operations pymatgen can apply, so only its asymmetric unit would be "
                        "screened; add a _space_group_symop_operation_xyz loop, give the Hermann-Mauguin "
                        "symbol, or export the full cell in P1")
    return None


def _cif_composition_problem(parser: CifParser, structure: Structure) -> str | None:
    """A reject text when the sites disagree with the CIF's own formula (pymatgen's
    ``CifParser.check``: elements missing, such as hydrogens an X-ray study could not place, or a
    different stoichiometry). A formula pymatgen cannot read is no evidence either way."""
    problem = parser.check(structure)
    if not problem or problem.startswith("Cannot determine"):
        return None
    block = next(iter(parser.as_dict().values()))
    formula = block.get("_chemical_formula_sum") or block.get("_chemical_formula_structural") or "?"
    return (f"{RejectCode.UNPARSEABLE}:CIF's atom sites give {structure.composition.reduced_formula} but "
            f"its formula is {str(formula).strip()!r} ({problem.split(':', 1)[0].strip()}); add the missing "
            "atom sites (X-ray structures often leave out hydrogens) or fix the formula")


def _parse_poscar(text: str) -> Structure | str:
    from pymatgen.io.vasp import Poscar
    from pymatgen.io.vasp.inputs import BadPoscarWarning

    if problem := _poscar_count_problem(text):
        return problem
    text = _apply_axis_scales(text)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", BadPoscarWarning)
        structure = Poscar.from_str(text).structure
    if not any("cannot be determined" in str(w.message) for w in caught):
        return structure
    # VASP 4 format: no species line, no symbols after the coordinates. pymatgen would name the
    # species H, He, Li, ...; the convention (ASE's too) is the symbols on the comment line.
    names = _comment_line_species(text)
    if names is None:
        comment = text.split("\n", 1)[0].strip()
        return (f"{RejectCode.UNPARSEABLE}:POSCAR names no elements: VASP 4 format (no species line above "
                "the counts, no element symbols after the coordinates), and its comment line "
                f"({comment[:40]!r}) does not name one element per count; add the species line, e.g. "
                "'Li Co O', above the counts line")
    return Poscar.from_str(text, default_names=names).structure


def _poscar_layout(text: str) -> tuple[list[str], int, int] | None:
    """A POSCAR's header and coordinate lines (up to the first blank line), the index of its counts
    line and of its Direct/Cartesian line; None when it is not laid out as expected."""
    lines = re.split(r"\n\s*\n", text.rstrip())[0].split("\n")  # header + coordinates, as pymatgen
    at = next((i for i in range(5, min(len(lines), 16)) if _ints(lines[i])), None)  # counts line
    if at is None:
        return None
    mode = at + 1
    while mode < len(lines) and _ints(lines[mode]):  # counts over several lines (pymatgen reads those)
        mode += 1
    if mode < len(lines) and lines[mode].strip()[:1] in ("s", "S"):  # Selective dynamics
        mode += 1
    return lines, at, mode


def _poscar_count_problem(text: str) -> str | None:
    """A reject text when a POSCAR's counts line and its coordinate lines disagree, or None.

    pymatgen reads as many coordinate lines as the counts add up to and ignores what follows up to
    the first blank line (velocities come after one): an atom added by hand without raising its
    count would be dropped without a word. Too few lines would fail with an IndexError.
    """
    if (layout := _poscar_layout(text)) is None:
        return None  # pymatgen decides
    lines, at, mode = layout
    counts = [c for line in lines[at:mode] for c in _ints(line)]
    n = sum(counts)
    coords = lines[mode + 1:]
    selective = lines[mode - 1].strip()[:1] in ("s", "S")
    if at == 6 and (problem := _poscar_species_problem(lines[5].split(), counts, coords[:n],
                                                       selective=selective)):
        return problem
    if len(coords) < n:
        return (f"{RejectCode.UNPARSEABLE}:POSCAR's counts add up to {n} atoms but it has {len(coords)} "
                "coordinate lines; fix the counts line")
    if len(coords) > n and len(_floats(coords[n])) >= 3:
        return (f"{RejectCode.UNPARSEABLE}:POSCAR's counts add up to {n} atoms but more coordinate lines "
                f"follow ({len(coords)} before the first blank line); fix the counts line, or put a "
                "blank line before velocities")
    return None


def _poscar_species_problem(names: list[str], counts: list[int], coords: list[str], *,
                            selective: bool) -> str | None:
    """A reject text when a VASP 5 species line cannot be the one its counts and atoms mean.

    pymatgen pairs names with counts in order and ignores extra names (``Li Co Ni O`` over
    ``3 3 6`` read the oxygens as Ni) and the element symbols VASP tools write after each
    atom's coordinates. Names are compared as POTCAR names (``Li_sv``, ``Li_sv/hash`` -> Li).
    """
    symbols = [re.split(r"[_/.]", name, maxsplit=1)[0] for name in names]
    if not symbols:
        return None
    if len(symbols) != len(counts):
        return (f"{RejectCode.UNPARSEABLE}:POSCAR's species line names {len(symbols)} elements "
                f"({' '.join(names)}) but its counts line has {len(counts)} counts; give one "
                "count per element")
    from pymatgen.core.periodic_table import Element

    expected = [sym for sym, c in zip(symbols, counts, strict=True) for _ in range(c)]
    skip = 6 if selective else 3
    labels = [line.split()[skip] if len(line.split()) > skip else "" for line in coords]
    if len(labels) == len(expected) and all(Element.is_valid_symbol(x) for x in labels):
        wrong = next((i for i, (a, b) in enumerate(zip(labels, expected, strict=True)) if a != b),
                     None)
        if wrong is not None:
            return (f"{RejectCode.UNPARSEABLE}:POSCAR atom {wrong + 1} is labelled {labels[wrong]} "
                    f"after its coordinates, but the species and counts lines make it "
                    f"{expected[wrong]}; fix the species line, the counts or the atom order")
    return None


def _apply_axis_scales(text: str) -> str:
    """A POSCAR with three scaling factors (VASP 6: one per Cartesian axis, for the lattice vectors and
    Cartesian positions) rewritten with the factors applied and a scale of 1, which pymatgen reads;
    any other POSCAR unchanged."""
    lines = text.split("\n")
    scales = _floats(lines[1]) if len(lines) > 1 else []
    if len(scales) != 3:
        return text
    if min(scales) <= 0:
        raise ValueError(f"three scaling factors must all be positive, got {lines[1].strip()!r}")
    if (layout := _poscar_layout(text)) is None:
        raise ValueError("POSCAR with three scaling factors has no counts line where expected")
    _, at, mode = layout
    n_coords = sum(sum(_ints(line)) for line in lines[at:mode] if _ints(line))
    cartesian = lines[mode].strip()[:1] in ("c", "C", "k", "K")
    scaled = [*range(2, 5), *(range(mode + 1, mode + 1 + n_coords) if cartesian else ())]
    lines[1] = "1.0"
    for i in scaled:
        tokens = lines[i].split()
        lines[i] = " ".join([*(f"{float(x) * f:.12g}" for x, f in zip(tokens[:3], scales, strict=True)),
                             *tokens[3:]])
    return "\n".join(lines)


def _ints(line: str) -> list[int]:
    """The integers of a line made of integers only, else []."""
    try:
        return [int(x) for x in line.split()]
    except ValueError:
        return []


def _floats(line: str) -> list[float]:
    """The leading numbers of a line (a coordinate line's three, before flags and symbols)."""
    out = []
    for token in line.split():
        try:
            out.append(float(token))
        except ValueError:
            break
    return out


_COMMENT_SYMBOL = re.compile(r"^([A-Z][a-z]?)(\d*)$")


def _comment_line_species(text: str) -> list[str] | None:
    """Element names from a VASP 4 POSCAR's comment line (``Li Co O``, or a formula such as
    pymatgen's ``Li4 Co4 O8``), or None unless they name one element per count on the counts line
    (in the counts' proportions when they carry numbers)."""
    from pymatgen.core import Element

    lines = text.splitlines()
    if len(lines) < 6:
        return None
    try:
        counts = [int(x) for x in lines[5].split()]
    except ValueError:
        return None
    matches = [_COMMENT_SYMBOL.match(token) for token in lines[0].split()]
    if len(matches) != len(counts) or not all(m and Element.is_valid_symbol(m.group(1)) for m in matches):
        return None
    given = [int(m.group(2) or 1) for m in matches]
    if any(m.group(2) for m in matches) and len({n / g for n, g in zip(counts, given, strict=True)}) != 1:
        return None  # a formula on the comment line, in other proportions than the counts
    return [m.group(1) for m in matches]


def _parse_extxyz(text: str) -> Structure | str:
    from ase.io import read
    from pymatgen.io.ase import AseAtomsAdaptor

    if problem := _extxyz_count_problem(text):
        return problem
    atoms = read(io.StringIO(text), format="extxyz")
    if not all(atoms.pbc) or atoms.cell.rank < 3:
        return (f"{RejectCode.DEGENERATE_LATTICE}:extxyz frame has no 3D periodic cell; add "
                'Lattice="..." and pbc="T T T" to the comment line')
    return AseAtomsAdaptor.get_structure(atoms)


def _extxyz_count_problem(text: str) -> str | None:
    """A reject text when a frame's count line disagrees with its atom lines (ASE would read as many
    atoms as the count says and drop, or misread, the rest)."""
    lines = text.splitlines()
    head = lines[0].strip() if lines else ""
    if not head.isdigit():
        return None  # not a count line: ASE says what is wrong
    n_lines = sum(1 for line in lines[2:] if line.strip())
    if n_lines == int(head):
        return None
    return (f"{RejectCode.UNPARSEABLE}:extxyz frame's count line says {int(head)} atoms but {n_lines} "
            "atom lines follow its comment line; fix the count line (or the atom lines)")


def _parse_res(text: str) -> Structure | str:
    """A SHELX/AIRSS ``.res`` block read with pymatgen's parser, checked where pymatgen is silent.

    pymatgen ignores the ``LATT`` card, an atom's SFAC index and its occupancy, and takes the
    element from the atom's label. Here the element is SHELX's, the SFAC index (a label naming
    another element is a reject); the occupancy is kept (SHELX's fixed form ``11.0`` is 1.0), so that
    a partly occupied site is validation's ``partial_occupancy`` reject; and a ``LATT`` other than
    ``-1`` (P1, what AIRSS and pymatgen write) is a reject, since its centring and inversion would
    not be applied and only the listed atoms screened. A block without ``LATT`` is read as P1.
    """
    from pymatgen.io.res import ResProvider

    if (latt := _res_card(text, "LATT")) is not None and latt != ["-1"]:
        return (f"{RejectCode.UNPARSEABLE}:.res has 'LATT {' '.join(latt)}': SHELX lattice centring or "
                "inversion, which is not applied, so only the listed atoms would be screened; write the "
                "full cell with 'LATT -1' (as AIRSS and pymatgen do)")
    provider = ResProvider.from_str(text)
    sfac = provider._res.SFAC  # pymatgen's parsed SFAC block: species [S], ions [N]
    species, coords = [], []
    for ion in sfac.ions:
        if not 1 <= ion.specie_num <= len(sfac.species):
            return (f"{RejectCode.UNPARSEABLE}:.res atom {ion.specie!r} has SFAC index {ion.specie_num}, "
                    f"but SFAC lists {len(sfac.species)} elements ({' '.join(sfac.species)})")
        element = sfac.species[ion.specie_num - 1]
        if (named := _label_elements(ion.specie)) and element not in named:
            return (f"{RejectCode.UNPARSEABLE}:.res atom label {ion.specie!r} names {' or '.join(named)} "
                    f"but its SFAC index {ion.specie_num} is {element}; fix the label or the index")
        occupancy = ion.occupancy - 10.0 if 10.0 < ion.occupancy < 20.0 else ion.occupancy
        if not 0.0 < occupancy <= 1.0 + seedcard.OCCUPANCY_TOLERANCE:
            return (f"{RejectCode.UNPARSEABLE}:.res atom {ion.specie!r} has occupancy {ion.occupancy:g} "
                    "(a SHELX free variable, or out of range); give each occupancy as a number in (0, 1]")
        species.append({element: min(occupancy, 1.0)})
        coords.append(ion.pos)
    return Structure(provider.lattice, species, coords)


def _res_card(text: str, card: str) -> list[str] | None:
    """The values after the first ``card`` line of a .res block, or None when it has none."""
    for line in text.splitlines():
        fields = line.split()
        if fields and fields[0].upper() == card:
            return fields[1:]
    return None


def _label_elements(label: str) -> tuple[str, ...]:
    """The elements a SHELX atom label can name (``Co1`` -> Co, ``O2a`` -> O); empty for none.

    A label in one case (``CO1``, ``os1``: old SHELX files are upper case) is ambiguous between
    its two-letter and its one-letter reading, so both are returned; ``Co1`` names only Co.
    """
    from pymatgen.core.periodic_table import Element

    letters = re.match(r"[A-Za-z]+", label)
    if not letters:
        return ()
    word = letters.group()
    one, two = word[0].upper(), word[:2].capitalize() if len(word) >= 2 else ""
    if word[:1].isupper() and word[1:2].islower():  # "Co1" names Co; "Oa1" is O with a suffix
        readings = (two,) if Element.is_valid_symbol(two) else (one,)
    else:
        readings = (two, one)
    return tuple(r for r in readings if r and Element.is_valid_symbol(r))


def _parse_json(text: str) -> Structure | str:
    obj = json.loads(text)
    if not isinstance(obj, dict):
        raise ValueError(f"expected a Structure dict, got {type(obj).__name__}")
    pbc = obj.get("lattice", {}).get("pbc") if isinstance(obj.get("lattice"), dict) else None
    if isinstance(pbc, list | tuple) and not (len(pbc) == 3 and all(p == 1 for p in pbc)):  # true or 1
        # a slab or wire (pymatgen's Lattice keeps pbc); read as a 3D crystal it would be one
        return (f"{RejectCode.DEGENERATE_LATTICE}:Structure dict has lattice pbc {list(pbc)}, not periodic "
                "in all three directions; only bulk crystals are screened (set pbc to [true, true, true] "
                "if the cell is a bulk one)")
    return structure_from_untrusted_dict(obj)


_MARKERS = ("@module", "@class", "@callable", "@bound")


def _refuse_object_markers(value: Any, where: str) -> None:
    """Raise ValueError if a nested dict carries monty's object markers (code would be imported)."""
    if isinstance(value, dict):
        bad = [k for k in _MARKERS if k in value]
        if bad:
            raise ValueError(f"{where} holds serialized Python objects ({', '.join(bad)}); "
                             "structure files must contain plain data only")
        for k, v in value.items():
            _refuse_object_markers(v, f"{where}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _refuse_object_markers(v, f"{where}[{i}]")


def structure_from_untrusted_dict(obj: dict[str, Any]) -> Structure:
    """A Structure from an untrusted ``Structure.as_dict()``-shaped dict, without monty decoding.

    ``Structure.from_dict`` decodes site properties with monty's MontyDecoder, which imports any
    module named by ``@module``/``@class`` and calls it; so only the plain data is kept here
    (lattice matrix or parameters, per-site species/occupancies/oxidation states, fractional coordinates,
    labels, charge) and every other key, site properties included, is dropped. A dict that asks
    for decoding anywhere below the Structure and Lattice markers is refused outright.
    """
    _refuse_object_markers(obj.get("sites"), "sites")
    try:
        matrix = _lattice_matrix(obj["lattice"])
        sites = []
        for site in obj["sites"]:
            species = [{"element": str(sp["element"]), "occu": float(sp.get("occu", 1.0)),
                        **({"oxidation_state": float(sp["oxidation_state"])}
                           if sp.get("oxidation_state") is not None else {})}
                       for sp in site["species"]]
            clean = {"species": species, "abc": [float(x) for x in site["abc"]]}
            if isinstance(site.get("label"), str):
                clean["label"] = site["label"]
            sites.append(clean)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"not a pymatgen Structure dict ({type(e).__name__}: {e})") from e
    charge = obj.get("charge")
    return Structure.from_dict({"lattice": {"matrix": matrix}, "sites": sites,
                                "charge": float(charge) if isinstance(charge, int | float) else 0.0})


def _lattice_matrix(lattice: dict[str, Any]) -> list[list[float]]:
    """Cell vectors (rows, Angstrom) of a Lattice dict: its ``matrix``, or, as pymatgen's
    ``Lattice.from_dict`` takes them, ``a, b, c`` (Angstrom) and ``alpha, beta, gamma`` (degrees)."""
    if "matrix" in lattice:
        return [[float(x) for x in row] for row in lattice["matrix"]]
    from pymatgen.core import Lattice

    params = [float(lattice[k]) for k in ("a", "b", "c", "alpha", "beta", "gamma")]
    return Lattice.from_parameters(*params).matrix.tolist()


_PARSERS = {
    "cif": _parse_cif,
    "poscar": _parse_poscar,
    "extxyz": _parse_extxyz,
    "res": _parse_res,
    "pymatgen_json": _parse_json,
}
