"""Reference convex hulls (GGA/GGA+U, MP2020-corrected) and the MP2020 energy correction.

Energies: ``energy_per_atom`` and hull energies in eV/atom on the MP2020-corrected GGA/GGA+U scale;
ComputedStructureEntry ``energy`` values are totals in eV.

Sources of reference entries:

* ``snapshot:PATH`` - JSON lines (gzip or plain) of ``ComputedStructureEntry.as_dict()``, e.g.
  ``../shared/data/mp_reference_entries.jsonl.gz``.
* ``mp`` - the live Materials Project (``MPRester.get_entries_in_chemsys`` with
  ``thermo_types=["GGA_GGA+U"]``), fetched lazily per chemical system and cached on disk
  (``~/.cache/cathode_ray/references/`` unless a cache directory is given).
"""

from __future__ import annotations

import functools
import gzip
import json
import os
import warnings
from collections.abc import Iterable, Sequence
from itertools import combinations
from pathlib import Path
from typing import Any

from pymatgen.analysis.phase_diagram import PhaseDiagram
from pymatgen.analysis.structure_analyzer import oxide_type as classify_oxide
from pymatgen.core import Composition, Structure
from pymatgen.entries.compatibility import MaterialsProject2020Compatibility
from pymatgen.entries.computed_entries import ComputedEntry, ComputedStructureEntry

DEFAULT_CACHE_DIR: Path = Path("~/.cache/cathode_ray/references").expanduser()
THERMO_TYPE: str = "GGA_GGA+U"


class NoReferenceError(LookupError):
    """No convex hull can be built for a chemical system (no entries, or a missing element)."""


def _material_id(entry: ComputedEntry) -> str:
    return str(entry.data.get("material_id") or entry.entry_id)


def _chemsys(elements: Iterable[str]) -> str:
    return "-".join(sorted(set(elements)))


def _subsystems(chemsys: str) -> list[str]:
    """All non-empty sub-chemical-systems of ``chemsys`` ("Li-O" -> ["Li", "O", "Li-O"])."""
    els = sorted(chemsys.split("-"))
    return ["-".join(c) for n in range(1, len(els) + 1) for c in combinations(els, n)]


def _entry_chemsys(entry: ComputedEntry) -> str:
    return _chemsys(el.symbol for el in entry.composition.elements)


def read_entries_jsonl(path: str | os.PathLike[str]) -> list[ComputedEntry]:
    """Read ComputedStructureEntry dicts, one per line, from a (gzipped) JSON-lines file, as
    ComputedEntry: a hull needs each entry's composition, energy (eV, with its MP2020
    adjustments) and ids, not its structure. Building the 2,646 snapshot structures was 5.4 of
    the 7.7 s this took, paid by every graph actor of every screen.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: a line is not a valid entry (message names the line).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reference entries file {path} not found; pass snapshot:PATH")
    opener = gzip.open if path.name.endswith(".gz") else open
    entries: list[ComputedEntry] = []
    try:
        with opener(path, "rt", encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    doc = json.loads(line)
                    structure = doc.pop("structure", None)
                    if "composition" not in doc and structure is not None:
                        doc["composition"] = Structure.from_dict(structure).composition.as_dict()
                    entries.append(ComputedEntry.from_dict(doc))
                except (ValueError, KeyError, TypeError) as exc:
                    raise ValueError(
                        f"{path}:{lineno}: not a ComputedStructureEntry dict ({exc}); "
                        "regenerate the reference file"
                    ) from exc
    except (OSError, EOFError) as exc:
        raise ValueError(f"{path}: unreadable reference file ({exc})") from exc
    return entries


def fetch_mp_entries(
    chemsys: str,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    api_key: str | None = None,
    endpoint: str | None = None,
) -> list[ComputedEntry]:
    """GGA/GGA+U entries of ``chemsys`` and all its subsystems from MP, cached on disk per chemsys.

    The API key comes from ``api_key`` or ``MP_API_KEY``; it is never written to the cache.
    """
    from mp_api.client import MPRester  # heavy import, only when MP is used

    cache = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE_DIR
    cache_file = cache / f"{chemsys}.jsonl.gz"
    if cache_file.is_file():
        return read_entries_jsonl(cache_file)
    with MPRester(
        api_key or os.environ.get("MP_API_KEY"),
        endpoint=endpoint or os.environ.get("MP_API_ENDPOINT") or None,
        mute_progress_bars=True,
    ) as mpr:
        entries = mpr.get_entries_in_chemsys(
            chemsys.split("-"), additional_criteria={"thermo_types": [THERMO_TYPE]}
        )
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache_file.with_suffix(".tmp")
    with gzip.open(tmp, "wt", encoding="utf-8") as fh:
        for entry in entries:
            fh.write(json.dumps(entry.as_dict(), default=str) + "\n")  # EntryID, MPID -> str
    tmp.replace(cache_file)
    return list(entries)


def check_reference_source(source: str) -> None:
    """Fail fast on a reference source that cannot load: ``snapshot:PATH`` whose file is missing,
    or a source that is neither that nor ``mp``. Cheap (no file is read).

    Raises:
        FileNotFoundError: the snapshot file does not exist.
        ValueError: unknown source.
    """
    if source.startswith("snapshot:"):
        path = Path(source.removeprefix("snapshot:"))
        if not path.is_file():
            raise FileNotFoundError(f"reference entries file {path} not found; pass "
                                    "--references snapshot:PATH (mp_reference_entries.jsonl.gz) or mp")
    elif source != "mp":
        raise ValueError(f"unknown reference source {source!r}; use 'snapshot:PATH' or 'mp'")


def load_reference_entries(
    source: str,
    *,
    elements: Sequence[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> list[ComputedEntry]:
    """Reference entries from ``snapshot:PATH`` (all of them) or ``mp`` (needs ``elements``).

    Raises:
        FileNotFoundError: the snapshot file does not exist.
        ValueError: unknown source, or ``mp`` without elements.
    """
    check_reference_source(source)
    if source.startswith("snapshot:"):
        entries = read_entries_jsonl(source.removeprefix("snapshot:"))
        if elements is None:
            return entries
        allowed = set(elements)
        return [e for e in entries if {el.symbol for el in e.composition.elements} <= allowed]
    if not elements:
        raise ValueError("source 'mp' needs the elements of the chemical system to fetch")
    return fetch_mp_entries(_chemsys(elements), cache_dir=cache_dir)


class ReferenceHull:
    """Convex hulls per chemical system, built lazily and cached; picklable (caches are dropped).

    ``entries`` given up front (snapshot) are indexed by chemical system; with ``source="mp"``
    entries are fetched per chemical system on first use (cached on disk and in memory).
    Leave-self-out: ``exclude_ids`` removes reference entries by ``data.material_id``; a diagram
    is rebuilt only when an excluded entry is a stable (hull) entry of that system (or becomes one
    once other excluded entries are gone), and that rebuild is cached under
    ``(chemsys, excluded stable ids)``.
    """

    def __init__(
        self,
        entries: Iterable[ComputedEntry] | None = None,
        *,
        source: str | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        if (entries is None) == (source is None):
            raise ValueError("give exactly one of entries or source ('mp' or 'snapshot:PATH')")
        self._source = source
        self._cache_dir = str(cache_dir) if cache_dir is not None else None
        self._by_chemsys: dict[str, list[ComputedEntry]] = {}
        self._fetched: set[str] = set()
        if source is not None and source != "mp":
            entries = load_reference_entries(source)
        if entries is not None:
            for entry in entries:
                self._by_chemsys.setdefault(_entry_chemsys(entry), []).append(entry)
        self._diagrams: dict[tuple[str, frozenset[str]], PhaseDiagram] = {}

    @classmethod
    def from_source(
        cls, source: str, *, cache_dir: str | os.PathLike[str] | None = None
    ) -> ReferenceHull:
        """``ReferenceHull`` over ``mp`` (lazy) or ``snapshot:PATH`` (read now)."""
        return cls(source=source, cache_dir=cache_dir)

    # -- pickling: ship entries, not diagrams ---------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_diagrams"] = {}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    # -- entries ------------------------------------------------------------------------------
    def _ensure_fetched(self, chemsys: str) -> None:
        if self._source != "mp" or chemsys in self._fetched:
            return
        for entry in fetch_mp_entries(chemsys, cache_dir=self._cache_dir):
            key = _entry_chemsys(entry)
            known = {_material_id(e) for e in self._by_chemsys.get(key, [])}
            if _material_id(entry) not in known:
                self._by_chemsys.setdefault(key, []).append(entry)
        self._fetched.update(_subsystems(chemsys))

    def entries_for(self, chemsys: str) -> list[ComputedEntry]:
        """All reference entries whose elements lie within ``chemsys`` (e.g. ``"Li-Mn-O"``)."""
        chemsys = _chemsys(chemsys.split("-"))
        self._ensure_fetched(chemsys)
        return [e for sub in _subsystems(chemsys) for e in self._by_chemsys.get(sub, [])]

    def has_references(self, composition: Composition | str) -> bool:
        """True when a hull can be built: entries exist for every element of ``composition``."""
        chemsys = Composition(composition).chemical_system
        elements = set(chemsys.split("-"))
        entries = self.entries_for(chemsys)
        return elements <= {e.composition.elements[0].symbol for e in entries if e.is_element}

    # -- diagrams -----------------------------------------------------------------------------
    def _build(self, chemsys: str, entries: list[ComputedEntry]) -> PhaseDiagram:
        elements = set(chemsys.split("-"))
        have = {e.composition.elements[0].symbol for e in entries if e.is_element}
        if not entries or not elements <= have:
            missing = sorted(elements - have)
            raise NoReferenceError(
                f"no convex hull for {chemsys}: missing elemental reference entries for "
                f"{missing}; add reference entries for this chemical system "
                "(source 'mp' or a larger snapshot) or treat the candidate as out of domain"
            )
        return PhaseDiagram(entries)

    def diagram(self, chemsys: str, *, exclude_ids: Iterable[str] = ()) -> PhaseDiagram:
        """The PhaseDiagram of ``chemsys`` (with all subsystems), minus excluded hull entries."""
        chemsys = _chemsys(chemsys.split("-"))
        base_key = (chemsys, frozenset())
        if base_key not in self._diagrams:
            self._diagrams[base_key] = self._build(chemsys, self.entries_for(chemsys))
        base = self._diagrams[base_key]
        excluded = set(exclude_ids)
        pd, stable_out = base, frozenset[str]()
        # Removing entries above the hull leaves it unchanged, so only excluded hull entries are
        # removed; repeated, because an excluded entry can reach the hull once another is gone.
        while newly := ({_material_id(e) for e in pd.stable_entries} & excluded) - stable_out:
            stable_out |= newly
            key = (chemsys, stable_out)
            if key not in self._diagrams:
                kept = [e for e in base.all_entries if _material_id(e) not in stable_out]
                self._diagrams[key] = self._build(chemsys, kept)
            pd = self._diagrams[key]
        return pd

    def hull_energy_per_atom(
        self, composition: Composition | str, *, exclude_ids: Iterable[str] = ()
    ) -> float:
        """Hull energy at ``composition`` in eV/atom (MP2020-corrected GGA/GGA+U scale).

        Raises:
            NoReferenceError: no hull can be built for the chemical system.
        """
        comp = Composition(composition)
        pd = self.diagram(comp.chemical_system, exclude_ids=exclude_ids)
        return float(pd.get_hull_energy_per_atom(comp))

    def e_above_hull(
        self,
        composition: Composition | str,
        energy_per_atom: float,
        *,
        exclude_ids: Iterable[str] = (),
    ) -> float:
        """``energy_per_atom`` (eV/atom, corrected scale) minus the hull energy, in eV/atom.

        Not clipped: a negative value means the structure would lie below the reference hull
        (e.g. a stable material with itself left out).
        """
        return float(energy_per_atom) - self.hull_energy_per_atom(
            composition, exclude_ids=exclude_ids
        )


def _hubbard_parameters(composition: Composition) -> dict[str, Any]:
    """run_type/hubbards as MP's GGA(+U) workflow sets them for ``composition`` (U in eV)."""
    u_settings = _compat().u_settings  # {anion: {element: U}}
    symbols = {el.symbol for el in composition.elements}
    anion = "O" if "O" in symbols else ("F" if "F" in symbols else None)
    hubbards = {el: u for el, u in u_settings.get(anion, {}).items() if el in symbols}
    return {
        "run_type": "GGA+U" if hubbards else "GGA",
        "is_hubbard": bool(hubbards),
        "hubbards": hubbards,
        "potcar_symbols": [],
    }


@functools.lru_cache(maxsize=1)
def _compat() -> MaterialsProject2020Compatibility:
    """One compatibility scheme per process (building it parses pymatgen's YAML settings)."""
    return MaterialsProject2020Compatibility(check_potcar=False)


def mp2020_correction_per_atom(structure: Structure, *, oxide_type: str | None = None) -> float:
    """Energy correction (eV/atom) MaterialsProject2020Compatibility adds to a GGA(+U) energy.

    For backbones that predict uncorrected DFT energies (e.g. MACE-MP-0): corrected energy per
    atom = predicted + this value. Anion and GGA+U corrections are applied as MP does; POTCAR
    checks are skipped (no VASP run behind the structure). The oxide type (oxide, peroxide,
    superoxide, ozonide) is classified from O-O distances in ``structure`` exactly as the
    compatibility scheme does (``oxide_type(structure, 1.05)``) unless ``oxide_type`` is given.
    The correction is linear in the amounts of each element, so it is computed once per
    (reduced composition, oxide type) and cached: a screen of many substituted candidates pays
    the compatibility scheme once per distinct chemistry. On the offline snapshot this
    reproduces MP's stored correction to 1e-9 eV/atom for 1,319 of 1,326 materials; the 7 others
    have short O-O contacts (pymatgen: peroxide/superoxide/ozonide) and MP's stored correction
    is 0.1-0.4 eV/atom smaller in magnitude (cause not yet identified).

    Raises:
        ValueError: the compatibility scheme rejects the structure (e.g. unsupported mixing).
    """
    comp = structure.composition
    symbols = {e.symbol for e in comp.elements}
    if oxide_type is None:
        oxide_type = classify_oxide(structure, 1.05) if "O" in symbols else "oxide"
    if "S" in symbols:  # sulfide type is structural too: not cached
        return _correction_per_atom(structure, oxide_type)
    key = tuple(sorted((el.symbol, float(a)) for el, a in comp.reduced_composition.items()))
    return _cached_correction_per_atom(key, oxide_type)


@functools.lru_cache(maxsize=100_000)
def _cached_correction_per_atom(composition: tuple[tuple[str, float], ...], oxide_type: str) -> float:
    return _correction_per_atom(Composition(dict(composition)), oxide_type)


def _correction_per_atom(what: Structure | Composition, oxide_type: str) -> float:
    comp = what.composition if isinstance(what, Structure) else what
    params, data = _hubbard_parameters(comp), {"oxide_type": oxide_type}
    entry = (ComputedStructureEntry(what, energy=0.0, parameters=params, data=data)
             if isinstance(what, Structure) else ComputedEntry(what, energy=0.0, parameters=params, data=data))
    with warnings.catch_warnings():
        # Mixed-valence oxides (Li9Mn7O16 ...): MP assigns the anion correction the same way.
        warnings.filterwarnings("ignore", message="Failed to guess oxidation states")
        processed = _compat().process_entry(entry, clean=True, inplace=False)
    if processed is None:
        raise ValueError(
            f"MP2020 compatibility rejected {comp.formula}; this chemistry cannot be placed "
            "on the corrected GGA/GGA+U scale"
        )
    return float(processed.correction) / comp.num_atoms
