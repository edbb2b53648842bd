"""A deterministic demo library of Li-TM-O cathode candidates, built in code (no downloads).

Four textbook prototypes, built with ``Structure.from_spacegroup`` (lattice parameters in Angstrom,
Wyckoff positions from the literature):

* ``layered`` LiMO2, R-3m (alpha-NaFeO2 type, LiCoO2): 12-atom hexagonal cell, 24-atom 2x1x1 supercell
* ``spinel`` LiM2O4, Fd-3m (LiMn2O4, origin choice 1): 14-atom primitive cell, 56-atom cubic cell
* ``olivine`` LiMPO4, Pnma (LiFePO4): 28-atom cell
* ``li2mo3`` Li2MO3, C2/m (Li2MnO3): 24-atom cell

The transition-metal sites are filled with one, two or three of Ti V Cr Mn Fe Co Ni Cu (random
orderings of mixed TMs), and most candidates get a small lattice strain (1-3 %, isotropic or along
one axis). Draws are de-duplicated with :func:`cathode_ray.data.generate.structure_fingerprint`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pymatgen.core import Lattice, Structure

from cathode_ray import seedcard
from cathode_ray.data.generate import structure_fingerprint
from cathode_ray.storage import filesystem_for

#: Placeholder species on transition-metal sites in the prototypes.
TM_PLACEHOLDER = "Co"


@dataclass(frozen=True, kw_only=True)
class Prototype:
    """One prototype: name, space group, lattice (Angstrom, degrees), Wyckoff sites (fractional)."""

    name: str
    spacegroup: str
    lattice: tuple[float, ...]  # a, b, c, alpha, beta, gamma
    species: tuple[str, ...]
    coords: tuple[tuple[float, float, float], ...]
    supercell: tuple[int, int, int] | None = None  # larger cell for mixed-TM orderings
    primitive: bool = False  # reduce the conventional cell to the primitive one (smaller)


PROTOTYPES: tuple[Prototype, ...] = (
    Prototype(
        name="layered", spacegroup="R-3m", lattice=(2.816, 2.816, 14.05, 90, 90, 120),
        species=("Li", TM_PLACEHOLDER, "O"),
        coords=((0, 0, 0.5), (0, 0, 0), (0, 0, 0.2396)), supercell=(2, 1, 1),
    ),
    Prototype(
        name="spinel", spacegroup="Fd-3m", lattice=(8.24, 8.24, 8.24, 90, 90, 90),
        species=("Li", TM_PLACEHOLDER, "O"),
        coords=((0, 0, 0), (0.625, 0.625, 0.625), (0.388, 0.388, 0.388)), primitive=True,
    ),
    Prototype(
        name="olivine", spacegroup="Pnma", lattice=(10.33, 6.01, 4.69, 90, 90, 90),
        species=("Li", TM_PLACEHOLDER, "P", "O", "O", "O"),
        coords=((0, 0, 0), (0.282, 0.25, 0.975), (0.095, 0.25, 0.418), (0.097, 0.25, 0.743),
                (0.457, 0.25, 0.206), (0.166, 0.046, 0.285)),
    ),
    Prototype(
        name="li2mo3", spacegroup="C2/m", lattice=(4.93, 8.53, 5.03, 90, 109.46, 90),
        species=("Li", "Li", "Li", TM_PLACEHOLDER, "O", "O"),
        coords=((0, 0.5, 0), (0, 0, 0.5), (0, 0.661, 0.5), (0, 0.167, 0), (0.219, 0, 0.227),
                (0.254, 0.321, 0.223)),
    ),
)


@cache
def prototype_cells(name: str) -> tuple[Structure, ...]:
    """The cells of one prototype (base cell, then the supercell/conventional cell if any)."""
    proto = next(p for p in PROTOTYPES if p.name == name)
    cell = Structure.from_spacegroup(
        proto.spacegroup, Lattice.from_parameters(*proto.lattice), list(proto.species),
        [list(c) for c in proto.coords],
    )
    cells = [cell]
    if proto.primitive:
        cells = [cell.get_primitive_structure(), cell]
    if proto.supercell is not None:
        cells.append(cell.make_supercell(proto.supercell, in_place=False))
    return tuple(cells)


def _tm_sites(structure: Structure) -> list[int]:
    return [i for i, site in enumerate(structure) if site.specie.symbol == TM_PLACEHOLDER]


def _draw(rng: np.random.Generator, proto: Prototype) -> tuple[Structure, str]:
    """One random candidate of a prototype: (structure, short description of the draw)."""
    cells = prototype_cells(proto.name)
    n_tm = int(rng.choice([1, 1, 2, 2, 2, 3]))  # how many distinct TMs
    cell = cells[0] if n_tm == 1 or len(cells) == 1 else cells[int(rng.integers(len(cells)))]
    structure = cell.copy()
    sites = _tm_sites(structure)
    n_tm = min(n_tm, len(sites))
    tms = list(rng.choice(seedcard.TRANSITION_METALS, size=n_tm, replace=False))
    # (n_tm_sites,) each TM at least once, the rest random
    assignment = tms + list(rng.choice(tms, size=len(sites) - n_tm))
    rng.shuffle(assignment)
    for index, element in zip(sites, assignment, strict=True):
        structure.replace(index, str(element))
    if rng.random() < 0.7:
        eps = float(rng.choice([-1, 1]) * rng.choice([0.01, 0.015, 0.02, 0.025, 0.03]))
        axis = int(rng.integers(4))  # 0..2: one axis, 3: isotropic
        scale = np.ones(3) * (1 + eps) if axis == 3 else np.where(np.arange(3) == axis, 1 + eps, 1)
        structure.lattice = Lattice(structure.lattice.matrix * scale[:, None])  # (3, 3) Angstrom
    return structure, proto.name


def id_formula(structure: Structure) -> str:
    """Reduced formula without pymatgen's polyanion brackets, e.g. ``LiCo2O4`` (not Li(CoO2)2)."""
    tokens = structure.composition.reduced_composition.formula.split()  # e.g. ["Li1", "Co2", "O4"]
    return "".join(re.sub(r"^([A-Z][a-z]?)1$", r"\1", tok) for tok in tokens)


def demo_library(n: int = 2000, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` distinct valid-shaped demo rows (structure_id, source, formula, chemsys, nsites,
    structure_json), the same for the same ``(n, seed)``; at most 56 atoms per structure."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    draw = 0
    while len(rows) < n:
        if draw > 50 * n + 100:
            raise RuntimeError(f"could not draw {n} distinct demo structures; lower n")
        rng = np.random.default_rng([seed, draw])
        proto = PROTOTYPES[draw % len(PROTOTYPES)]
        draw += 1
        structure, name = _draw(rng, proto)
        key = structure_fingerprint(structure)
        if key in seen:
            continue
        seen.add(key)
        formula = structure.composition.reduced_formula
        rows.append({
            "structure_id": f"demo-{name}-{id_formula(structure)}-{len(rows):04d}",
            "source": "demo",
            "formula": formula,
            "chemsys": structure.composition.chemical_system,
            "nsites": len(structure),
            "structure_json": structure.to_json(),
        })
    return rows


def write_demo_library(path: str, n: int = 2000, seed: int = 0) -> str:
    """Write :func:`demo_library` rows as one Parquet file (local path or s3:// URI); returns path."""
    fs, fs_path = filesystem_for(path)
    parent = fs_path.rsplit("/", 1)[0]
    if parent:
        fs.create_dir(parent, recursive=True)
    table = pa.Table.from_pylist(demo_library(n, seed))
    pq.write_table(table, fs_path, filesystem=fs)
    return path
