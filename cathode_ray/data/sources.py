"""Where materials come from: the live Materials Project (mp-api) or a recorded snapshot.

Both give the same document shape (an MP *summary* document as a plain dict, ``structure`` as
``Structure.as_dict()``), so everything downstream is source-agnostic. Energies are eV/atom
(MP2020-corrected GGA/GGA+U unless named ``uncorrected``).

The pinned query (:data:`PINNED_QUERY`): materials whose elements include Li and O and at least
one transition metal of :data:`cathode_ray.seedcard.TRANSITION_METALS`. mp-api cannot express "at
least one of" in one call, so :func:`fetch_mp_summary` runs one ``summary.search`` per metal
(``elements=["Li", "O", tm]``, ``deprecated=False``) and unions the results by ``material_id``.

Labels come from one thermo type, :data:`LABEL_THERMO_TYPE` (GGA/GGA+U, MP2020-corrected), the scale
of the reference hulls (:mod:`cathode_ray.data.references`) and of the offline snapshot. MP's
summary documents carry the *mixed* GGA/GGA+U/r2SCAN hull's values instead (its default thermo
type since 2022), which differ for materials with r2SCAN calculations, so :func:`fetch_mp_summary`
replaces the summary's label fields (:data:`LABEL_FIELDS`) by those of the material's GGA_GGA+U
thermo document. A material without one keeps no label: ingest rejects it with a reason.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import urllib.request
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pymatgen.core import Structure

from cathode_ray import seedcard
from cathode_ray.data.parse import structure_from_untrusted_dict
from cathode_ray.data.references import THERMO_TYPE

#: The thermo type labels are taken from (the reference hulls' scale).
LABEL_THERMO_TYPE: str = THERMO_TYPE

#: The pinned data query, recorded in DATA_VERSION.json.
PINNED_QUERY: dict[str, Any] = {
    "collection": "materials/summary",
    "elements_all": ["Li", "O"],
    "elements_any": list(seedcard.TRANSITION_METALS),
    "deprecated": False,
    "label_thermo_type": LABEL_THERMO_TYPE,
}

#: Summary fields requested from MP (and present in snapshots).
SUMMARY_FIELDS: tuple[str, ...] = (
    "material_id",
    "formula_pretty",
    "chemsys",
    "elements",
    "nelements",
    "nsites",
    "energy_above_hull",
    "formation_energy_per_atom",
    "is_stable",
    "energy_per_atom",
    "uncorrected_energy_per_atom",
    "structure",
    "deprecated",
    "theoretical",
)

#: Decimal places kept for floats when hashing (well below DFT precision, above float noise).
_HASH_DECIMALS: int = 8
#: Label fields (eV/atom; ``is_stable`` bool) replaced by the GGA_GGA+U thermo document's values.
LABEL_FIELDS: tuple[str, ...] = (
    "energy_above_hull",
    "formation_energy_per_atom",
    "is_stable",
    "energy_per_atom",
    "uncorrected_energy_per_atom",
)
#: material_ids per thermo request (keeps the URL short; mp-api would split on HTTP 414 anyway).
_THERMO_IDS_PER_REQUEST: int = 200
_HEARTBEAT_TIMEOUT_S: float = 20.0
_DEFAULT_ENDPOINT: str = "https://api.materialsproject.org/"

Doc = dict[str, Any]
log = logging.getLogger(__name__)


class SourceError(RuntimeError):
    """A materials source could not be read or queried; the message says what to do."""


def read_snapshot(path: str | os.PathLike[str]) -> list[Doc]:
    """Read MP-summary-shaped documents from a JSON-lines file (``.gz`` or plain).

    Raises:
        SourceError: the file is missing, truncated/corrupt, or a line is not a JSON object
            with a ``material_id`` (the message names the line).
    """
    path = Path(path)
    if not path.is_file():
        raise SourceError(
            f"snapshot {path} not found; pass --source snapshot:PATH to a .jsonl(.gz)"
        )
    opener = gzip.open if path.name.endswith(".gz") else open
    docs: list[Doc] = []
    try:
        with opener(path, "rt", encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, start=1):
                if line.strip():
                    docs.append(_parse_line(line, path=path, lineno=lineno))
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise SourceError(
            f"snapshot {path} is unreadable or truncated ({exc}); re-download or re-export it"
        ) from exc
    return docs


def _parse_line(line: str, *, path: Path, lineno: int) -> Doc:
    try:
        doc = json.loads(line)
    except json.JSONDecodeError as exc:
        raise SourceError(
            f"{path}:{lineno}: not valid JSON ({exc.msg}); fix or drop the line"
        ) from exc
    if not isinstance(doc, dict) or "material_id" not in doc:
        raise SourceError(f"{path}:{lineno}: expected a JSON object with a material_id")
    return doc


def _resolve_api_key(api_key: str | None) -> str:
    key = api_key or os.environ.get("MP_API_KEY")
    if not key:
        raise SourceError(
            "no Materials Project API key: set MP_API_KEY (get one at "
            "https://materialsproject.org/api) or use --source snapshot:PATH"
        )
    return key


def resolve_endpoint(endpoint: str | None) -> str:
    """``endpoint``, else ``MP_API_ENDPOINT`` read now, else the public MP API.

    (mp-api reads MP_API_ENDPOINT once at import; reading it here honours later changes.)
    """
    return endpoint or os.environ.get("MP_API_ENDPOINT") or _DEFAULT_ENDPOINT


def _as_dict(raw: Any) -> Doc:
    """An mp-api result (dict or document model) as a plain dict."""
    return dict(raw.model_dump() if hasattr(raw, "model_dump") else raw)


def _normalise_doc(raw: Any) -> Doc:
    """An mp-api result (dict or document model) as a plain snapshot-shaped dict."""
    doc = _as_dict(raw)
    out = {k: doc[k] for k in SUMMARY_FIELDS if k in doc and doc[k] is not None}
    out["material_id"] = str(doc["material_id"])
    if "structure" in out:
        structure = out["structure"]
        if not isinstance(structure, Structure):
            structure = structure_from_untrusted_dict(structure)
        out["structure"] = structure.as_dict()
    if "elements" in out:
        out["elements"] = [str(e) for e in out["elements"]]
    return out


def fetch_mp_summary(
    *,
    api_key: str | None = None,
    endpoint: str | None = None,
    transition_metals: Sequence[str] = seedcard.TRANSITION_METALS,
    fields: Sequence[str] = SUMMARY_FIELDS,
    label_thermo_type: str | None = LABEL_THERMO_TYPE,
) -> list[Doc]:
    """Fetch the pinned Li-TM-O query from MP: one filtered search per TM, union by material_id.

    ``api_key`` defaults to ``MP_API_KEY`` and ``endpoint`` to ``MP_API_ENDPOINT`` (both read by
    MPRester); the key is never logged or stored. Each per-metal result is checked against the
    server's document count, so truncated paging is an error, not silently fewer materials.
    Returned docs are sorted by material_id.

    ``label_thermo_type`` (default GGA_GGA+U): the label fields (:data:`LABEL_FIELDS`) are replaced
    by that thermo type's values and ``thermo_type`` names it; a material without such a thermo
    document is returned without labels. ``None`` keeps the summary's own (mixed-hull) values.

    Raises:
        SourceError: no API key, MP refused/failed the query, or a result was incomplete.
    """
    from mp_api.client import MPRester  # heavy import, only when MP is used
    from mp_api.client.core.client import MPRestError

    by_id: dict[str, Doc] = {}
    try:
        with MPRester(
            _resolve_api_key(api_key),
            endpoint=resolve_endpoint(endpoint),
            use_document_model=False,
            mute_progress_bars=True,
        ) as mpr:
            for tm in transition_metals:
                # Always filtered: an unfiltered search makes mp-api download full datasets.
                # Deprecated materials (superseded calculations) are never labels.
                elements = ["Li", "O", tm]
                hits = mpr.materials.summary.search(
                    elements=elements, deprecated=False, fields=list(fields), all_fields=False
                )
                _check_complete(mpr, elements, got=len(hits))
                for raw in hits:
                    doc = _normalise_doc(raw)
                    by_id.setdefault(doc["material_id"], doc)
            if label_thermo_type is not None:
                _relabel(mpr, by_id, label_thermo_type)
    except MPRestError as exc:
        raise SourceError(f"Materials Project query failed: {exc}") from exc
    return [by_id[k] for k in sorted(by_id)]


def _relabel(mpr: Any, by_id: dict[str, Doc], thermo_type: str) -> None:
    """Replace each doc's :data:`LABEL_FIELDS` by its ``thermo_type`` thermo document's, in place.

    Docs without such a document lose their labels (ingest then rejects them as unlabelled).
    """
    ids = sorted(by_id)
    labels: dict[str, Doc] = {}
    for start in range(0, len(ids), _THERMO_IDS_PER_REQUEST):
        hits = mpr.materials.thermo.search(
            material_ids=ids[start : start + _THERMO_IDS_PER_REQUEST],
            thermo_types=[thermo_type],
            fields=["material_id", "thermo_type", *LABEL_FIELDS],
            all_fields=False,
        )
        labels.update((str(d["material_id"]), d) for d in map(_as_dict, hits))
    missing = 0
    for mid, doc in by_id.items():
        for key in LABEL_FIELDS:
            doc.pop(key, None)
        if mid in labels:
            doc.update({k: labels[mid][k] for k in LABEL_FIELDS if labels[mid].get(k) is not None})
            doc["thermo_type"] = thermo_type
        else:
            missing += 1
    if missing:
        log.warning("%d of %d materials have no %s thermo document; they carry no label",
                    missing, len(by_id), thermo_type)


def _check_complete(mpr: Any, elements: list[str], *, got: int) -> None:
    """Raise when mp-api returned fewer documents than the server counts (truncated paging)."""
    expected = int(mpr.materials.summary.count({"elements": ",".join(elements), "deprecated": False}))
    if got != expected:
        raise SourceError(
            f"MP returned {got} of {expected} summary documents for elements={elements}; "
            "paging was truncated - retry, or check MP_API_ENDPOINT"
        )


def mp_database_version(*, endpoint: str | None = None, api_key: str | None = None) -> str:
    """The MP database version (``db_version`` of ``GET {endpoint}/heartbeat``).

    ``endpoint`` defaults to ``MP_API_ENDPOINT`` then the public API. The heartbeat needs no key;
    ``api_key`` (or ``MP_API_KEY``) is sent as ``x-api-key`` only if given.
    """
    url = resolve_endpoint(endpoint).rstrip("/") + "/heartbeat"
    headers = {"x-api-key": key} if (key := api_key or os.environ.get("MP_API_KEY")) else {}
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=_HEARTBEAT_TIMEOUT_S) as resp:
            body = json.loads(resp.read())
    except (OSError, ValueError) as exc:
        raise SourceError(f"cannot read MP heartbeat at {url} ({exc})") from exc
    if "db_version" not in body:
        raise SourceError(f"MP heartbeat at {url} has no db_version: {sorted(body)}")
    return str(body["db_version"])


def _canonical(value: Any) -> Any:
    """JSON-ready value with floats rounded to _HASH_DECIMALS (stable across JSON round trips)."""
    if isinstance(value, float):
        return round(value, _HASH_DECIMALS) + 0.0  # +0.0 folds -0.0 into 0.0
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in value.items() if not str(k).startswith("@")}
    if isinstance(value, list | tuple):
        return [_canonical(v) for v in value]
    return value


def _structure_key(structure: Doc | Structure) -> Doc:
    """The hashed part of a structure: lattice matrix (Angstrom), species, fractional coords."""
    if not isinstance(structure, Structure):
        try:
            structure = structure_from_untrusted_dict(structure)
        except Exception:  # noqa: BLE001 - a broken structure still hashes (as its raw dict)
            return {"raw": structure}
    s = structure
    return {
        "lattice": s.lattice.matrix.tolist(),  # [3, 3]
        "species": [site.species_string for site in s],
        "frac_coords": s.frac_coords.tolist(),  # [nsites, 3]
    }


def content_hash(docs: Iterable[Doc]) -> str:
    """sha256 over (material_id, energy_above_hull, structure), in material_id order.

    Canonical JSON (sorted keys, floats rounded to 8 decimals, structure reduced to lattice,
    species and fractional coordinates), so a snapshot and the MP API serving the same data
    give the same hash.
    """
    digest = hashlib.sha256()
    for doc in sorted(docs, key=lambda d: str(d["material_id"])):
        record = {
            "material_id": str(doc["material_id"]),
            "energy_above_hull": doc.get("energy_above_hull"),
            "structure": _structure_key(doc["structure"]) if doc.get("structure") else None,
        }
        line = json.dumps(_canonical(record), sort_keys=True, separators=(",", ":"))
        digest.update(line.encode() + b"\n")
    return digest.hexdigest()


def data_version(
    docs: Sequence[Doc],
    *,
    source: str,
    query: dict[str, Any] | None,
    db_version: str | None,
) -> dict[str, Any]:
    """Content of DATA_VERSION.json: source, query, db_version, UTC date, count, sha256."""
    return {
        "source": source,
        "query": query,
        "db_version": db_version,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "count": len(docs),
        "sha256": content_hash(docs),
    }
