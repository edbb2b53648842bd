"""Validation of parsed structures: every input becomes a valid row or a reject row with a code.

A site holding one element at an occupancy within ``occupancy_tolerance`` of 1 (a database's
rounding, e.g. 0.9999) is made fully occupied first; any other partial occupancy is rejected.
Checks run cheapest and most fundamental first, so that NaN or degenerate cells never reach the
neighbour search: empty -> too_many_atoms -> partial_occupancy -> unsupported_element ->
degenerate_lattice -> non_finite_coordinates -> out_of_scope -> overlapping_atoms / isolated_atom
(one pymatgen neighbour list) -> missing_label. The neighbour search's cost grows with how far atoms
lie outside the cell and how thin the cell is, so coordinates more than ``MAX_CELLS_OUT`` cells away
and cells too small or too thin to hold atoms ``min_distance`` apart are rejected before it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pymatgen.core import Element, Lattice, Structure

from cathode_ray import seedcard
from cathode_ray.data.library import PASSTHROUGH_FIELDS, is_missing
from cathode_ray.data.parse import parse_raw
from cathode_ray.data.records import Reject, RejectCode

#: Elements CHGNet and MACE-MP-0 were trained on: H (Z=1) to Pu (Z=94).
DEFAULT_SUPPORTED_ELEMENTS: frozenset[str] = frozenset(Element.from_Z(z).symbol for z in range(1, 95))

#: Smallest cell volume (Angstrom^3) accepted as a real 3D lattice.
MIN_VOLUME: float = 1e-3

#: Largest |fractional coordinate| accepted: a site 1e5 cells away (e.g. Cartesian values under
#: a POSCAR "Direct" header) is an input error, and would make the neighbour search run for minutes.
MAX_CELLS_OUT: float = 100.0


@dataclass(frozen=True, kw_only=True)
class ValidationConfig:
    """Limits for accepting a structure.

    Attributes:
        max_atoms: most sites per cell.
        min_distance: smallest allowed interatomic distance, Angstrom.
        cutoff: an atom with no neighbour within this radius (Angstrom) is ``isolated_atom``.
        reject_isolated: reject structures with an isolated atom (True for screening; ingest of
            labelled MP materials turns it off: those are real DFT-relaxed entries, and the
            backbone gives an isolated atom no edges).
        require_label: reject rows whose ``energy_above_hull`` (eV/atom) is missing or NaN.
        require_li / require_o / require_tm: chemistry scope (Li, O, one of ``transition_metals``).
        transition_metals: element symbols counted as transition metals for the scope check.
        supported_elements: element symbols the backbones cover (default Z 1..94).
        occupancy_tolerance: a one-element site with |occupancy - 1| <= this is fully occupied.
    """

    max_atoms: int = seedcard.MAX_ATOMS
    min_distance: float = seedcard.MIN_DISTANCE
    cutoff: float = 6.0
    require_label: bool = False
    reject_isolated: bool = True
    require_li: bool = True
    require_o: bool = True
    require_tm: bool = True
    transition_metals: tuple[str, ...] = seedcard.TRANSITION_METALS
    supported_elements: frozenset[str] = field(default=DEFAULT_SUPPORTED_ELEMENTS, repr=False)
    occupancy_tolerance: float = seedcard.OCCUPANCY_TOLERANCE

    def __post_init__(self) -> None:
        if not 0 <= self.occupancy_tolerance < 0.5:
            raise ValueError(f"occupancy_tolerance must be in [0, 0.5), got {self.occupancy_tolerance}")
        if self.max_atoms < 1:
            raise ValueError(f"max_atoms must be >= 1, got {self.max_atoms}")
        if not self.min_distance > 0:
            raise ValueError(f"min_distance must be > 0 Angstrom, got {self.min_distance}")
        if not self.cutoff > self.min_distance:
            raise ValueError(
                f"cutoff ({self.cutoff} A) must exceed min_distance ({self.min_distance} A)"
            )
        if self.require_tm and not self.transition_metals:
            raise ValueError("require_tm needs a non-empty transition_metals tuple")
        unknown = [s for s in self.transition_metals if s not in self.supported_elements]
        if unknown:
            raise ValueError(f"transition_metals {unknown} are not in supported_elements")


def _reject(sid: str, source: str, code: RejectCode, message: str) -> Reject:
    return Reject(structure_id=sid, source=source, reason=code, message=message)


def validate_structure(
    structure: Structure,
    *,
    structure_id: str,
    source: str,
    config: ValidationConfig,
    labels: dict[str, Any] | None = None,
) -> Reject | None:
    """Return a Reject (first failing check) or None when the structure is fit for screening."""
    for check in (_check_size, _check_species, _check_lattice, _check_coords, _check_scope,
                  _check_packing, _check_geometry):
        problem = check(structure, config)
        if problem is not None:
            return _reject(structure_id, source, *problem)
    if config.require_label and is_missing((labels or {}).get("energy_above_hull")):
        return _reject(structure_id, source, RejectCode.MISSING_LABEL,
                       "energy_above_hull (eV/atom) is missing or NaN; add the label or train "
                       "without this structure")
    return None


Problem = tuple[RejectCode, str] | None


def _check_size(structure: Structure, config: ValidationConfig) -> Problem:
    n = len(structure)
    if n == 0:
        return RejectCode.UNPARSEABLE, "structure has no sites; check the file"
    if n > config.max_atoms:
        return (RejectCode.TOO_MANY_ATOMS,
                f"{n} sites > max_atoms={config.max_atoms}; use the primitive cell "
                "(structure.get_primitive_structure()) or raise max_atoms")
    return None


def _check_species(structure: Structure, config: ValidationConfig) -> Problem:
    if not structure.is_ordered:
        bad = next(s for s in structure if not s.is_ordered)
        return (RejectCode.PARTIAL_OCCUPANCY,
                f"site {bad.species} has partial occupancy; fix the occupancies or order the "
                "structure with pymatgen OrderDisorderedStructureTransformation")
    symbols = {getattr(sp, "symbol", str(sp)) for sp in structure.composition.elements}
    unsupported = sorted(symbols - config.supported_elements)
    if unsupported:
        return (RejectCode.UNSUPPORTED_ELEMENT,
                f"elements {unsupported} are not covered by the potentials (supported: Z 1..94 "
                "by default); remove them or screen this structure elsewhere")
    return None


def _check_lattice(structure: Structure, config: ValidationConfig) -> Problem:
    matrix = np.asarray(structure.lattice.matrix, dtype=float)  # (3, 3) Angstrom
    if not np.all(np.isfinite(matrix)):
        return RejectCode.DEGENERATE_LATTICE, "lattice has NaN/inf entries; fix the cell vectors"
    det = float(np.linalg.det(matrix))  # signed cell volume, Angstrom^3
    if det < -MIN_VOLUME:
        return (RejectCode.DEGENERATE_LATTICE,
                f"lattice is left-handed (determinant {det:.3g} A^3); reorder or negate the cell "
                "vectors to a right-handed set")
    if det <= MIN_VOLUME:
        return (RejectCode.DEGENERATE_LATTICE,
                f"cell volume {det:.3g} A^3 <= {MIN_VOLUME} A^3 (coplanar or zero cell vectors); "
                "fix the lattice")
    return None


def _check_coords(structure: Structure, config: ValidationConfig) -> Problem:
    frac = np.asarray(structure.frac_coords, dtype=float)  # (n_sites, 3)
    if not np.all(np.isfinite(frac)):
        bad = int(np.flatnonzero(~np.all(np.isfinite(frac), axis=1))[0])
        return (RejectCode.NON_FINITE_COORDINATES,
                f"site {bad} has NaN/inf coordinates; fix the atomic positions")
    far = np.abs(frac).max(axis=1) > MAX_CELLS_OUT
    if np.any(far):
        bad = int(np.flatnonzero(far)[0])
        return (RejectCode.NON_FINITE_COORDINATES,
                f"site {bad} has fractional coordinates {np.round(frac[bad], 3).tolist()}, more "
                f"than {MAX_CELLS_OUT:g} cells outside the cell (Cartesian values under a "
                "'Direct' header?); give positions inside the cell")
    return None


def _check_scope(structure: Structure, config: ValidationConfig) -> Problem:
    symbols = {el.symbol for el in structure.composition.elements}
    missing: list[str] = []
    if config.require_li and "Li" not in symbols:
        missing.append("no Li")
    if config.require_o and "O" not in symbols:
        missing.append("no O")
    if config.require_tm and not symbols & set(config.transition_metals):
        missing.append(f"no transition metal of {'/'.join(config.transition_metals)}")
    if missing:
        return (RejectCode.OUT_OF_SCOPE,
                f"{structure.composition.reduced_formula}: {', '.join(missing)}; this screen is "
                "for Li-TM-O cathodes (relax the scope in ValidationConfig to screen others)")
    return None


def _check_packing(structure: Structure, config: ValidationConfig) -> Problem:
    """Cells that cannot hold their atoms ``min_distance`` apart, found without a neighbour
    search (which would need ~cutoff / thickness periodic images of such a cell)."""
    lengths = np.asarray(structure.lattice.abc, dtype=float)  # (3,) Angstrom
    if lengths.min() < config.min_distance:  # every atom overlaps its own periodic image
        return (RejectCode.OVERLAPPING_ATOMS,
                f"cell vector of {lengths.min():.3g} A < min_distance {config.min_distance} A: "
                "every atom overlaps its periodic image; fix the lattice")
    # densest packing of spheres of diameter d has d^3 / sqrt(2) per sphere
    floor = config.min_distance ** 3 / np.sqrt(2.0)
    per_atom = float(structure.volume) / len(structure)
    if per_atom < floor:
        return (RejectCode.OVERLAPPING_ATOMS,
                f"{per_atom:.3g} A^3 per atom < {floor:.3g} A^3, the least that atoms "
                f"{config.min_distance} A apart need: some must overlap; fix the cell or sites")
    return None


def _check_geometry(structure: Structure, config: ValidationConfig) -> Problem:
    # One pymatgen neighbour list at the isolation cutoff; self-pairs kept so that two atoms at
    # the same position (distance 0) are still seen, then the trivial (i, i, image 0) pair dropped.
    centers, neighbors, images, distances = structure.get_neighbor_list(
        r=config.cutoff, exclude_self=False
    )  # (n_pairs,), (n_pairs,), (n_pairs, 3), (n_pairs,) Angstrom
    trivial = (centers == neighbors) & np.all(images == 0, axis=1)
    centers, neighbors, distances = centers[~trivial], neighbors[~trivial], distances[~trivial]
    close = distances < config.min_distance
    if np.any(close):
        k = int(np.argmin(np.where(close, distances, np.inf)))
        i, j = int(centers[k]), int(neighbors[k])
        return (RejectCode.OVERLAPPING_ATOMS,
                f"sites {i} ({structure[i].specie}) and {j} ({structure[j].specie}) are "
                f"{distances[k]:.3f} A apart (< min_distance {config.min_distance} A); remove "
                "duplicate sites or fix the positions")
    lonely = np.setdiff1d(np.arange(len(structure)), centers)
    if lonely.size and config.reject_isolated:
        i = int(lonely[0])
        return (RejectCode.ISOLATED_ATOM,
                f"site {i} ({structure[i].specie}) has no neighbour within {config.cutoff} A "
                f"({lonely.size} such sites); check the cell and positions (vacuum/slab?)")
    return None


# --------------------------------------------------------------------------- rows
def fill_near_full_sites(structure: Structure, tolerance: float) -> Structure:
    """``structure`` with every one-element site whose occupancy is within ``tolerance`` of 1 made
    fully occupied (a new Structure; the same object when nothing changes). Sites with several
    elements or a clearly partial occupancy are left for validation to reject."""
    if structure.is_ordered:
        return structure
    filled = structure.copy()
    changed = False
    for index, site in enumerate(structure):
        if len(site.species) != 1:
            continue
        ((specie, occupancy),) = site.species.items()
        if occupancy != 1 and abs(occupancy - 1) <= tolerance:
            filled.replace(index, specie)
            changed = True
    return filled if changed else structure


def row_labels(raw_row: dict[str, Any]) -> dict[str, Any]:
    """Pass-through label/provenance fields present in a raw row."""
    return {k: raw_row[k] for k in PASSTHROUGH_FIELDS if k in raw_row}


def valid_row(structure: Structure, *, structure_id: str, source: str,
              labels: dict[str, Any] | None = None) -> dict[str, Any]:
    """The valid-row dict for an accepted structure (see :mod:`cathode_ray.data.records`)."""
    composition = structure.composition
    return {
        "structure_id": structure_id,
        "source": source,
        "formula": composition.reduced_formula,
        "chemsys": composition.chemical_system,
        "nsites": len(structure),
        "structure_json": structure.to_json(),
        **(labels or {}),
    }


def validate_row(
    raw_row: dict[str, Any], config: ValidationConfig
) -> tuple[dict[str, Any] | None, dict[str, str] | None]:
    """Parse and validate one raw row: ``(valid_row, None)`` or ``(None, reject_row)``.

    No duplicate-id check (see :func:`validate_rows`).
    """
    checked = validate_raw(raw_row, config)
    if isinstance(checked, Reject):
        return None, checked.as_row()
    return valid_row(checked, structure_id=str(raw_row["structure_id"]), source=str(raw_row["source"]),
                     labels=row_labels(raw_row)), None


def validate_raw(raw_row: dict[str, Any], config: ValidationConfig) -> Structure | Reject:
    """Parse and validate one raw row: the Structure, fit for screening, or the Reject saying why.

    No duplicate-id check and no serialisation (the screen's graph stage uses the Structure as is).
    """
    parsed = parse_raw(raw_row, max_sites=config.max_atoms)
    if isinstance(parsed, Reject):
        return parsed
    parsed = fill_near_full_sites(parsed, config.occupancy_tolerance)
    reject = validate_structure(parsed, structure_id=str(raw_row["structure_id"]),
                                source=str(raw_row["source"]), config=config, labels=row_labels(raw_row))
    return parsed if reject is None else reject


def validate_rows(
    raw_rows: Iterable[dict[str, Any]], config: ValidationConfig
) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """Validate raw rows: ``(valid rows, reject rows)`` with ``len(valid) + len(rejects) == inputs``.

    A structure_id seen before in the input is rejected as ``duplicate_id`` (first occurrence wins,
    whether it was valid or not).
    """
    valid: list[dict[str, Any]] = []
    rejects: list[dict[str, str]] = []
    seen: dict[str, str] = {}
    for raw in raw_rows:
        sid, source = str(raw["structure_id"]), str(raw["source"])
        if sid in seen:
            rejects.append(_reject(sid, source, RejectCode.DUPLICATE_ID,
                                   f"structure_id {sid!r} already used by an input from "
                                   f"{seen[sid]}; give every structure a unique id").as_row())
            continue
        seen[sid] = source
        good, bad = validate_row(raw, config)
        if good is not None:
            valid.append(good)
        else:
            rejects.append(bad)  # type: ignore[arg-type]
    return valid, rejects


@dataclass(frozen=True)
class CompactStructure:
    """A validated (ordered) structure as three arrays: what the screen's graph stage needs of it.

    The screen validates in light tasks and builds graphs in CPU actors, so validated structures
    cross processes. As arrays they pickle to ~1 KiB per 36-site candidate (6.8 KiB as pymatgen
    JSON), and making them plus rebuilding the Structure costs 0.47 ms against 1.29 ms for
    ``to_json`` + ``Structure.from_str`` (``docs/performance.md``). Not kept: oxidation states, site labels and
    properties, charge; graphs, hull inputs and SOAP use only elements and geometry.
    """

    lattice: np.ndarray  # [3, 3] Angstrom, rows are the cell vectors
    numbers: np.ndarray  # [n] atomic numbers, int16
    frac_coords: np.ndarray  # [n, 3] fractional coordinates

    @classmethod
    def from_structure(cls, structure: Structure) -> CompactStructure:
        """Raises ValueError for a disordered structure (validation rejects those first)."""
        if not structure.is_ordered:
            raise ValueError("CompactStructure holds ordered structures only")
        return cls(lattice=np.array(structure.lattice.matrix, dtype=np.float64),
                   numbers=np.array(structure.atomic_numbers, dtype=np.int16),
                   frac_coords=np.array(structure.frac_coords, dtype=np.float64))

    def to_structure(self) -> Structure:
        """The Structure again: same lattice, elements and fractional coordinates, bit for bit."""
        return Structure(Lattice(self.lattice), self.numbers.tolist(), self.frac_coords)
