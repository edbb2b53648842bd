"""Parse raw library rows into pymatgen Structures, or Reject rows that say why not.

Readers (:mod:`cathode_ray.data.library`) yield text payloads; this module turns each into a
Structure with pymatgen (CIF, POSCAR, SHELX/AIRSS ``.res``, Structure dicts) or ASE (extended XYZ).
Nothing in a payload is ever executed or unpickled: Structure dicts are rebuilt from plain data
(:func:`structure_from_untrusted_dict`), never through monty's decoder.
"""

from __future__ import annotations

import io
import json
import warnings
from typing import Any

from pymatgen.core import Structure

from cathode_ray import seedcard
from cathode_ray.data.library import FORMATS, cif_structure_blocks
from cathode_ray.data.records import Reject, RejectCode, short_error


def parse_raw(row: dict[str, Any]) -> Structure | Reject:
    """Parse one raw row into a pymatgen Structure, or a Reject (never raises on bad content).

    Text is parsed with pymatgen (CIF, POSCAR, SHELX .res, Structure.from_dict) or ASE (extended XYZ via
    AseAtomsAdaptor); nothing is executed or unpickled.
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
            result = parser(str(row["payload"]))
    except Exception as exc:  # noqa: BLE001 - untrusted input: every parser failure is a reject
        return Reject(structure_id=sid, source=source, reason=RejectCode.UNPARSEABLE,
                      message=f"cannot parse {fmt} ({type(exc).__name__}: {short_error(exc)}); "
                      "check the file with pymatgen/ASE and re-export it")
    if isinstance(result, str):
        code, message = result.split(":", 1)
        return Reject(structure_id=sid, source=source, reason=RejectCode(code), message=message)
    return result


def _parse_cif(text: str) -> Structure | str:
    from pymatgen.io.cif import CifParser

    blocks = cif_structure_blocks(text)
    if len(blocks) > 1:
        return (f"{RejectCode.MULTIPLE_STRUCTURES}:CIF holds {len(blocks)} data blocks with atom "
                "sites; give one structure per row")
    # a site over-full by a database's rounding (1.0001) is scaled to 1; validation fills 0.9999
    structures = CifParser.from_str(blocks[0] if blocks else text,
                                    occupancy_tolerance=1.0 + seedcard.OCCUPANCY_TOLERANCE
                                    ).parse_structures(primitive=False, on_error="raise")
    if len(structures) != 1:
        return (f"{RejectCode.MULTIPLE_STRUCTURES}:CIF holds {len(structures)} structures; "
                "split it into one file per structure")
    return structures[0]


def _parse_poscar(text: str) -> Structure:
    from pymatgen.io.vasp import Poscar

    return Poscar.from_str(text).structure


def _parse_extxyz(text: str) -> Structure | str:
    from ase.io import read
    from pymatgen.io.ase import AseAtomsAdaptor

    atoms = read(io.StringIO(text), format="extxyz")
    if not all(atoms.pbc) or atoms.cell.rank < 3:
        return (f"{RejectCode.DEGENERATE_LATTICE}:extxyz frame has no 3D periodic cell; add "
                'Lattice="..." and pbc="T T T" to the comment line')
    return AseAtomsAdaptor.get_structure(atoms)


def _parse_res(text: str) -> Structure:
    from pymatgen.io.res import ResIO

    return ResIO.structure_from_str(text)


def _parse_json(text: str) -> Structure:
    obj = json.loads(text)
    if not isinstance(obj, dict):
        raise ValueError(f"expected a Structure dict, got {type(obj).__name__}")
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
    (lattice matrix, per-site species/occupancies/oxidation states, fractional coordinates,
    labels, charge) and every other key, site properties included, is dropped. A dict that asks
    for decoding anywhere below the Structure and Lattice markers is refused outright.
    """
    _refuse_object_markers(obj.get("sites"), "sites")
    try:
        matrix = [[float(x) for x in row] for row in obj["lattice"]["matrix"]]
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


_PARSERS = {
    "cif": _parse_cif,
    "poscar": _parse_poscar,
    "extxyz": _parse_extxyz,
    "res": _parse_res,
    "pymatgen_json": _parse_json,
}
