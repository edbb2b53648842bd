"""Shared fixtures. Keep each fixture small and documented; append new ones below."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pymatgen.core import Lattice, Structure

from cathode_ray.testing.mp_server import MPServer

#: ../shared/data relative to the repository root (never copied into the repo).
SHARED_DATA: Path = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SUMMARY_FILE = "mp_litmo_summary.jsonl.gz"
REFERENCES_FILE = "mp_reference_entries.jsonl.gz"
#: A syntactically valid (32-character) MP API key for the local server.
TEST_API_KEY: str = "0123456789abcdef0123456789abcdef"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path of ../shared/data (real MP snapshot files); skips when it is absent."""
    needed = [SHARED_DATA / SUMMARY_FILE, SHARED_DATA / REFERENCES_FILE]
    missing = [p.name for p in needed if not p.is_file()]
    if missing:
        pytest.skip(
            f"real data {missing} not found under {SHARED_DATA}; place the MP snapshot files "
            "in ../shared/data (next to the repository) to run this test"
        )
    return SHARED_DATA


def tiny_summary_docs() -> list[dict[str, Any]]:
    """12 MP-summary-shaped docs: 8-atom rock-salt Li-M-O cells, M in Mn/Fe/Co/Ni, 3 formulas each.

    Distinct reduced formulas (LiMO2, Li3MO4, LiM3O4 per metal); lattice 4.0-4.3 Angstrom; labels
    in eV/atom are arbitrary but deterministic.
    """
    docs: list[dict[str, Any]] = []
    cation_sites = [[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]]
    anion_sites = [[0.5, 0, 0], [0, 0.5, 0], [0, 0, 0.5], [0.5, 0.5, 0.5]]
    for i, metal in enumerate(("Mn", "Fe", "Co", "Ni")):
        for j, n_li in enumerate((2, 3, 1)):
            cations = ["Li"] * n_li + [metal] * (4 - n_li)
            structure = Structure(
                Lattice.cubic(4.0 + 0.1 * j + 0.02 * i),
                cations + ["O"] * 4,
                cation_sites + anion_sites,
            )
            k = 3 * i + j
            e_hull = 0.01 * k
            docs.append(
                {
                    "material_id": f"mp-{1000 + k}",
                    "formula_pretty": structure.composition.reduced_formula,
                    "chemsys": structure.composition.chemical_system,
                    "elements": sorted({"Li", metal, "O"}),
                    "nelements": 3,
                    "nsites": len(structure),
                    "energy_above_hull": e_hull,
                    "formation_energy_per_atom": -2.0 + e_hull,
                    "is_stable": e_hull <= 1e-6,
                    "energy_per_atom": -6.0 + e_hull,
                    "uncorrected_energy_per_atom": -5.5 + e_hull,
                    "structure": structure.as_dict(),
                    "database_snapshot": "MP test",
                }
            )
    return docs


@pytest.fixture
def tiny_docs() -> list[dict[str, Any]]:
    """Fresh copy of :func:`tiny_summary_docs` (tests may mutate it)."""
    return tiny_summary_docs()


@pytest.fixture
def mp_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[MPServer]:
    """A running local MP API server (empty; fill with ``set_documents``).

    ``MP_API_KEY`` is set to a test key and ``MP_API_ENDPOINT`` to the server, so code that
    builds ``MPRester()`` from the environment talks to it.
    """
    server = MPServer()
    with server as url:
        monkeypatch.setenv("MP_API_KEY", TEST_API_KEY)
        monkeypatch.setenv("MP_API_ENDPOINT", url)
        yield server
