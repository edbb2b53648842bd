"""``cathode-ray ingest``: materials source -> validated, SOAP-clustered, split training dataset.

Writes to ``DATASET_DIR`` (a local path or any pyarrow filesystem URI, e.g. ``s3://bucket/ds``):

* ``materials.parquet`` - one row per accepted material: ``structure_id`` (= ``material_id``),
  ``material_id``, ``formula`` (reduced), ``formula_pretty``, ``chemsys``, ``elements`` (list),
  ``nsites``, ``energy_above_hull``, ``formation_energy_per_atom``, ``energy_per_atom``,
  ``uncorrected_energy_per_atom`` (eV/atom), ``is_stable``, ``database_snapshot``,
  ``structure`` (pymatgen JSON string), ``source``, ``soap_cluster``, ``split``.
* ``rejects.parquet`` - :data:`cathode_ray.data.records.REJECT_SCHEMA`; rows + rejects == inputs.
* ``soap_clusterer.json`` - :meth:`SoapClusterer.to_dict`.
* ``DATA_VERSION.json`` - :func:`cathode_ray.data.sources.data_version` of the input documents,
  plus row/reject counts, the LOCO cluster, split sizes and E_hull quantiles per split.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from pymatgen.core import Structure

from cathode_ray import seedcard
from cathode_ray.data import sources
from cathode_ray.data.parse import structure_from_untrusted_dict
from cathode_ray.data.records import REJECT_SCHEMA, Reject, RejectCode
from cathode_ray.data.splits import (
    SPLITS,
    SoapClusterer,
    SoapConfig,
    choose_loco_cluster,
    make_splits,
)
from cathode_ray.data.validate import ValidationConfig, validate_structure
from cathode_ray.storage import filesystem_for

MATERIALS_FILE = "materials.parquet"
REJECTS_FILE = "rejects.parquet"
CLUSTERER_FILE = "soap_clusterer.json"
DATA_VERSION_FILE = "DATA_VERSION.json"

MATERIALS_SCHEMA = pa.schema(
    [
        pa.field("structure_id", pa.string(), nullable=False),
        pa.field("material_id", pa.string(), nullable=False),
        pa.field("formula", pa.string(), nullable=False),
        pa.field("formula_pretty", pa.string()),
        pa.field("chemsys", pa.string(), nullable=False),
        pa.field("elements", pa.list_(pa.string()), nullable=False),
        pa.field("nsites", pa.int32(), nullable=False),
        pa.field("energy_above_hull", pa.float64(), nullable=False),  # eV/atom
        pa.field("formation_energy_per_atom", pa.float64()),  # eV/atom
        pa.field("energy_per_atom", pa.float64()),  # eV/atom, MP2020-corrected
        pa.field("uncorrected_energy_per_atom", pa.float64()),  # eV/atom, raw DFT
        pa.field("is_stable", pa.bool_()),
        pa.field("database_snapshot", pa.string()),
        pa.field("structure", pa.string(), nullable=False),  # pymatgen Structure JSON
        pa.field("source", pa.string(), nullable=False),
        pa.field("soap_cluster", pa.int32(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
    ]
)

_FLOAT_LABELS = (
    "energy_above_hull",
    "formation_energy_per_atom",
    "energy_per_atom",
    "uncorrected_energy_per_atom",
)


@dataclass(frozen=True, kw_only=True)
class IngestConfig:
    """What ``cathode-ray ingest`` does.

    Attributes:
        source: ``"mp"`` (live MP, needs MP_API_KEY; MP_API_ENDPOINT honoured) or
            ``"snapshot:PATH"`` (JSON lines of MP summary documents, gz or plain).
        out: dataset directory (local path or pyarrow filesystem URI such as ``s3://b/ds``).
        seed: split seed.
        loco_cluster: held-out cluster; None = nearest 10% of rows, -1 = no LOCO split.
        fractions: train/val/test row fractions of the non-LOCO rows.
        soap: SOAP/KMeans settings (r_cut in Angstrom).
        validation: structure checks; ``require_label`` is forced on and ``reject_isolated`` off
            (training data of real, labelled MP materials).
        mp_endpoint: MP API base URL (None: MP_API_ENDPOINT or the public API).
        verbose: print split sizes and E_hull quantiles.
    """

    source: str
    out: str
    seed: int = seedcard.SPLIT_SEED
    loco_cluster: int | None = None
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)
    soap: SoapConfig = field(default_factory=SoapConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    mp_endpoint: str | None = None
    verbose: bool = True

    def __post_init__(self) -> None:
        if self.source != "mp" and not self.source.startswith("snapshot:"):
            raise ValueError(f"source must be 'mp' or 'snapshot:PATH', got {self.source!r}")
        if self.source.startswith("snapshot:") and not self.source.removeprefix("snapshot:"):
            raise ValueError("snapshot source needs a path: snapshot:PATH")
        if not self.out:
            raise ValueError("out (dataset directory) must be given")
        if len(self.fractions) != 3 or not math.isclose(sum(self.fractions), 1.0):
            raise ValueError(f"fractions must be 3 numbers summing to 1, got {self.fractions}")


@dataclass(frozen=True, kw_only=True)
class IngestResult:
    """Outcome of :func:`run`. E_hull quantiles in eV/atom, keyed split -> quantile -> value."""

    out: str
    n_inputs: int
    n_rows: int
    n_rejects: int
    loco_cluster: int
    split_sizes: dict[str, int]
    ehull_quantiles: dict[str, dict[str, float]]
    data_version: dict[str, Any]


# --------------------------------------------------------------------------- reading
def read_documents(config: IngestConfig) -> tuple[list[dict[str, Any]], str | None]:
    """Input documents and the database version they come from."""
    if config.source == "mp":
        docs = sources.fetch_mp_summary(endpoint=config.mp_endpoint)
        return docs, sources.mp_database_version(endpoint=config.mp_endpoint)
    docs = sources.read_snapshot(config.source.removeprefix("snapshot:"))
    snapshots = sorted({str(d["database_snapshot"]) for d in docs if d.get("database_snapshot")})
    return docs, "; ".join(snapshots) or None


def _label(doc: dict[str, Any], key: str) -> float | None:
    value = doc.get(key)
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _doc_to_row(
    doc: dict[str, Any], *, source: str, config: ValidationConfig
) -> tuple[dict[str, Any] | None, Reject | None]:
    """One summary document -> (row without cluster/split, None) or (None, reject)."""
    sid = str(doc["material_id"])
    try:
        structure = structure_from_untrusted_dict(doc["structure"])
    except Exception as exc:  # noqa: BLE001 - any parse failure is a reject, not a crash
        return None, Reject(
            structure_id=sid,
            source=source,
            reason=RejectCode.UNPARSEABLE,
            message=f"structure is not a pymatgen Structure dict ({type(exc).__name__}: {exc}); "
            "re-export the document with Structure.as_dict()",
        )
    labels = {k: _label(doc, k) for k in _FLOAT_LABELS}
    reject = validate_structure(
        structure, structure_id=sid, source=source, config=config, labels=labels
    )
    if reject is not None:
        return None, reject
    comp = structure.composition
    row = {
        "structure_id": sid,
        "material_id": sid,
        "formula": comp.reduced_formula,
        "formula_pretty": doc.get("formula_pretty"),
        "chemsys": comp.chemical_system,
        "elements": sorted(el.symbol for el in comp.elements),
        "nsites": len(structure),
        **labels,
        "is_stable": doc.get("is_stable"),
        "database_snapshot": doc.get("database_snapshot"),
        "structure": structure.to_json(),
        "source": source,
    }
    return row, None


def convert_documents(
    docs: Sequence[dict[str, Any]], *, source: str, config: ValidationConfig
) -> tuple[list[dict[str, Any]], list[Reject], list[Structure]]:
    """Validate documents: (rows, rejects, structures of rows); rows + rejects == docs."""
    rows: list[dict[str, Any]] = []
    structures: list[Structure] = []
    rejects: list[Reject] = []
    seen: set[str] = set()
    for doc in docs:
        sid = str(doc.get("material_id", ""))
        if sid in seen:
            rejects.append(
                Reject(
                    structure_id=sid,
                    source=source,
                    reason=RejectCode.DUPLICATE_ID,
                    message=f"material_id {sid!r} appears twice in the source; "
                    "de-duplicate the snapshot",
                )
            )
            continue
        seen.add(sid)
        row, reject = _doc_to_row(doc, source=source, config=config)
        if reject is not None:
            rejects.append(reject)
        else:
            rows.append(row)  # type: ignore[arg-type]
            structures.append(Structure.from_str(row["structure"], fmt="json"))  # type: ignore[index]
    return rows, rejects, structures


# --------------------------------------------------------------------------- summary
def ehull_quantiles(
    df: pd.DataFrame, *, quantiles: Sequence[float] = seedcard.QUANTILES
) -> dict[str, dict[str, float]]:
    """E_hull (eV/atom) quantiles per split present in ``df``."""
    out: dict[str, dict[str, float]] = {}
    for split in SPLITS:
        values = df.loc[df["split"] == split, "energy_above_hull"]
        if len(values):
            out[split] = {f"q{q:g}": float(values.quantile(q)) for q in quantiles}
    return out


def format_summary(result: IngestResult) -> str:
    """Human-readable split sizes and E_hull quantiles (eV/atom)."""
    lines = [
        f"ingested {result.n_inputs} documents -> {result.n_rows} rows, "
        f"{result.n_rejects} rejects -> {result.out}",
        f"loco cluster: {result.loco_cluster}",
    ]
    for split, n in result.split_sizes.items():
        qs = result.ehull_quantiles.get(split, {})
        qtxt = "  ".join(f"{k}={v:.4f}" for k, v in qs.items())
        lines.append(f"  {split:5s} {n:6d}  E_hull eV/atom: {qtxt}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- IO
def _filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    return filesystem_for(uri)


def _write_json(fs: pafs.FileSystem, path: str, obj: Any) -> None:
    with fs.open_output_stream(path) as fh:
        fh.write(json.dumps(obj, indent=2, sort_keys=True).encode())


def _read_json(fs: pafs.FileSystem, path: str) -> Any:
    with fs.open_input_stream(path) as fh:
        return json.loads(fh.read())


def write_dataset(
    out: str,
    *,
    rows: pd.DataFrame,
    rejects: Sequence[Reject],
    clusterer: SoapClusterer,
    version: dict[str, Any],
) -> None:
    """Write the four dataset files under ``out`` (created if missing)."""
    fs, base = _filesystem(out)
    fs.create_dir(base, recursive=True)
    table = pa.Table.from_pandas(rows, schema=MATERIALS_SCHEMA, preserve_index=False)
    pq.write_table(table, f"{base}/{MATERIALS_FILE}", filesystem=fs)
    reject_table = pa.Table.from_pylist([r.as_row() for r in rejects], schema=REJECT_SCHEMA)
    pq.write_table(reject_table, f"{base}/{REJECTS_FILE}", filesystem=fs)
    _write_json(fs, f"{base}/{CLUSTERER_FILE}", clusterer.to_dict())
    _write_json(fs, f"{base}/{DATA_VERSION_FILE}", version)


def load_dataset(directory: str) -> pd.DataFrame:
    """``materials.parquet`` of a dataset directory (local path or URI) as a DataFrame."""
    fs, base = _filesystem(directory)
    path = f"{base}/{MATERIALS_FILE}"
    if fs.get_file_info(path).type != pafs.FileType.File:
        raise FileNotFoundError(
            f"{directory} has no {MATERIALS_FILE}; run `cathode-ray ingest --out {directory}`"
        )
    return pq.read_table(path, filesystem=fs).to_pandas()


def load_rejects(directory: str) -> pd.DataFrame:
    """``rejects.parquet`` of a dataset directory as a DataFrame (REJECT_SCHEMA columns)."""
    fs, base = _filesystem(directory)
    return pq.read_table(f"{base}/{REJECTS_FILE}", filesystem=fs).to_pandas()


def load_clusterer(directory: str) -> SoapClusterer:
    """The fitted SoapClusterer of a dataset directory."""
    fs, base = _filesystem(directory)
    return SoapClusterer.from_dict(_read_json(fs, f"{base}/{CLUSTERER_FILE}"))


def load_data_version(directory: str) -> dict[str, Any]:
    """DATA_VERSION.json of a dataset directory."""
    fs, base = _filesystem(directory)
    return _read_json(fs, f"{base}/{DATA_VERSION_FILE}")


def load_structures(df: pd.DataFrame) -> list[Structure]:
    """pymatgen Structures of the ``structure`` JSON column, in row order."""
    return [Structure.from_str(s, fmt="json") for s in df["structure"]]


# --------------------------------------------------------------------------- run
def run(config: IngestConfig) -> IngestResult:
    """Ingest ``config.source`` into ``config.out``; see the module docstring for the files.

    Raises:
        SourceError: the source cannot be read; ValueError: too few valid rows to cluster.
    """
    docs, db_version = read_documents(config)
    if not docs:
        raise sources.SourceError(f"source {config.source} returned no documents")
    validation = _with_label_required(config.validation)
    rows, rejects, structures = convert_documents(docs, source=config.source, config=validation)
    if len(rows) < config.soap.n_clusters:
        raise ValueError(
            f"only {len(rows)} valid materials (of {len(docs)}; see rejects) - need at least "
            f"n_clusters={config.soap.n_clusters} to SOAP-cluster; lower n_clusters"
        )
    clusterer = SoapClusterer(config.soap)
    df = pd.DataFrame(rows)
    df["soap_cluster"] = clusterer.fit_assign(structures).astype(np.int32)
    loco = config.loco_cluster
    if loco is None:
        loco = choose_loco_cluster(df["formula"], df["soap_cluster"].to_numpy())
    df["split"] = make_splits(
        df,
        clusters=df["soap_cluster"].to_numpy(),
        seed=config.seed,
        loco_cluster=loco,
        fractions=config.fractions,
    )
    sizes = {s: int((df["split"] == s).sum()) for s in SPLITS}
    quantiles = ehull_quantiles(df)
    query = sources.PINNED_QUERY if config.source == "mp" else None
    version = sources.data_version(docs, source=config.source, query=query, db_version=db_version)
    version |= {
        "n_rows": len(df),
        "n_rejects": len(rejects),
        "loco_cluster": int(loco),
        "split_sizes": sizes,
        "ehull_quantiles": quantiles,
    }
    write_dataset(config.out, rows=df, rejects=rejects, clusterer=clusterer, version=version)
    result = IngestResult(
        out=config.out,
        n_inputs=len(docs),
        n_rows=len(df),
        n_rejects=len(rejects),
        loco_cluster=int(loco),
        split_sizes=sizes,
        ehull_quantiles=quantiles,
        data_version=version,
    )
    if config.verbose:
        print(format_summary(result))
    return result


def _with_label_required(config: ValidationConfig) -> ValidationConfig:
    """Training-data checks: labels required; isolated atoms kept (real MP entries such as the
    slab-like mp-1213623 are DFT-relaxed, labelled and handled by the backbone)."""
    return replace(config, require_label=True, reject_isolated=False)
