"""Per-batch stages of the screening pipeline: pure functions and callable classes over pandas
batches, plus the two-way Parquet writer. Nothing here starts Ray; :mod:`.pipeline` wires them.

Row flow (one row per input occurrence; ``kind`` says what it is)::

    raw rows (structure_id, source, fmt, payload, error, order)
      -> ValidateStage       kind = valid | reject  (+ formula, chemsys, nsites, structure: CompactStructure)
      -> GraphStage          valid rows get graph, n_edges, hull inputs, soap_cluster, composition
      -> InferenceStage      valid rows become results (RESULT_COLUMNS) or inference_failed rejects
      -> ScreenWriter        results -> DEST/results/run_id=RUN/, rejects -> DEST/rejects/run_id=RUN/

``order`` is a deterministic input position (file index << 32 | row index in the file) used for
"first occurrence wins" de-duplication; ``occurrence`` is 0 for the first input with an id and k
for its k-th later duplicate, so (structure_id, occurrence) addresses every input (resume key).
Per-row ``t_<stage>`` columns carry each batch's wall time split over its rows; the writer sums them
into busy seconds per stage and drops them.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from cathode_ray import seedcard
from cathode_ray.data.library import LIBRARY_ROW_GROUP_ROWS, library_format, read_library_file
from cathode_ray.data.records import Reject, RejectCode
from cathode_ray.data.validate import CompactStructure, ValidationConfig, validate_raw
from cathode_ray.screen.malloc import retain_freed_memory
from cathode_ray.screen.schema import RESULT_SCHEMA, SCREEN_REJECT_SCHEMA, conform
from cathode_ray.storage import filesystem_for, write_parquet

log = logging.getLogger(__name__)

ORDER_SHIFT = 32  # rows per file < 2**32
RAW_COLUMNS: tuple[str, ...] = ("structure_id", "source", "fmt", "payload", "error", "order")
STAGE_TIMES: tuple[str, ...] = ("t_validate", "t_graph", "t_infer", "t_calibrate")
VALID, REJECT = "valid", "reject"
READ_CHUNK_ROWS = 256  # raw rows per block read from one library file (~2 MB of pymatgen JSON)
READ_TASK_ROWS = LIBRARY_ROW_GROUP_ROWS  # most rows one read task takes from a large Parquet file


# --------------------------------------------------------------------------- inputs
def order_key(file_index: int, row_index: int) -> int:
    """Deterministic input position: file index in the high bits, row in the file below."""
    return (int(file_index) << ORDER_SHIFT) | int(row_index)


def _raw(row: Mapping[str, Any], order: int) -> dict[str, Any]:
    """A raw row reduced to RAW_COLUMNS (labels are not needed for screening)."""
    return {"structure_id": str(row["structure_id"]), "source": str(row["source"]),
            "fmt": str(row.get("fmt", "")), "payload": str(row.get("payload", "")),
            "error": str(row.get("error", "") or ""), "order": order}


def read_items(files: Sequence[str], rows_per_file: Mapping[int, int],
               task_rows: int = READ_TASK_ROWS, *,
               labels: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Read tasks for ``files``: ``{"path", "file_index", "row_start", "row_stop", "label"}``
    (``labels``: the files' names in fallback ids, ``data.library.file_labels``).

    A plain Parquet file with more than ``task_rows`` rows (``rows_per_file``, counted by the
    index pass) is split into row ranges, so no read task holds more than ``task_rows`` inputs
    and the pipeline's object-store budget can pace reading; any other file is one task
    (``row_stop = -1``: the whole file).
    """
    items = []
    for i, path in enumerate(files):
        n = int(rows_per_file.get(i, 0))
        label = labels[i] if labels is not None else ""
        if n > task_rows and library_format(path) == "parquet" and not path.lower().endswith(".gz"):
            items += [{"path": path, "file_index": i, "row_start": a, "row_stop": min(a + task_rows, n),
                       "label": label} for a in range(0, n, task_rows)]
        else:
            items.append({"path": path, "file_index": i, "row_start": 0, "row_stop": -1,
                          "label": label})
    return items


def iter_file_rows(item: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """Raw rows (RAW_COLUMNS) of one read task (see :func:`read_items`; ``{"path",
    "file_index"}`` alone reads the whole file), one at a time."""
    fi, start, stop = int(item["file_index"]), int(item.get("row_start", 0)), int(item.get("row_stop", -1))
    rows = None if stop < 0 else (start, stop)
    label = str(item.get("label") or "") or None
    for i, r in enumerate(read_library_file(str(item["path"]), rows=rows, label=label), start=start):
        yield _raw(r, order_key(fi, i))


def read_file_chunks(items: pd.DataFrame, chunk_rows: int = READ_CHUNK_ROWS) -> Iterator[pd.DataFrame]:
    """Generator ``map_batches`` UDF: raw rows of the library files in ``items``, yielded
    ``chunk_rows`` at a time. Each chunk becomes its own block, so a 10,000-structure file
    streams through the pipeline in bounded pieces instead of arriving as one burst."""
    for item in items.to_dict("records"):
        chunk: list[dict[str, Any]] = []
        for row in iter_file_rows(item):
            chunk.append(row)
            if len(chunk) >= chunk_rows:
                yield pd.DataFrame(chunk, columns=list(RAW_COLUMNS))
                chunk = []
        if chunk:
            yield pd.DataFrame(chunk, columns=list(RAW_COLUMNS))


def read_file_ids(item: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Flat-map: ``{"structure_id", "order"}`` of every raw row of one file (index pass)."""
    return [{"structure_id": r["structure_id"], "order": r["order"]} for r in iter_file_rows(item)]


def count_rows_per_file(ids: pd.DataFrame) -> pd.DataFrame:
    """``map_batches`` over index-pass rows: ``{"file_index", "rows"}`` per file in the batch
    (the file index is the high part of ``order``, see :func:`order_key`)."""
    counts = pd.Series(ids["order"].to_numpy(np.int64) >> ORDER_SHIFT).value_counts().sort_index()
    return pd.DataFrame({"file_index": counts.index.to_numpy(np.int64),
                         "rows": counts.to_numpy(np.int64)})


def demo_raw_rows(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Raw rows for demo-library rows (``structure_json`` becomes a pymatgen_json payload)."""
    return [_raw({"structure_id": r["structure_id"], "source": r.get("source", "demo"),
                  "fmt": "pymatgen_json", "payload": r["structure_json"]}, order_key(0, i))
            for i, r in enumerate(rows)]


def mp_raw_rows(docs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Raw rows for Materials Project summary documents (``material_id`` + ``structure`` dict)."""
    out = []
    for i, doc in enumerate(docs):
        sid = str(doc.get("material_id") or f"mp#{i}")
        structure = doc.get("structure")
        if structure is None:
            row = {"structure_id": sid, "source": "mp", "fmt": "error",
                   "payload": "MP document has no structure", "error": str(RejectCode.UNPARSEABLE)}
        else:
            payload = structure if isinstance(structure, str) else json.dumps(structure)
            row = {"structure_id": sid, "source": "mp", "fmt": "pymatgen_json", "payload": payload}
        out.append(_raw(row, order_key(0, i)))
    return out


def duplicate_ranks(sids: Iterable[str], orders: Iterable[int]) -> dict[int, int]:
    """``{order: k}`` for every later occurrence (k >= 1) of a repeated structure id.

    Occurrences are ranked by ``order``; the first (k = 0) wins and is not listed. Only rows of
    repeated ids need to be passed (the pipeline finds them with a Ray Data groupby).
    """
    by_sid: dict[str, list[int]] = {}
    for sid, order in zip(sids, orders, strict=True):
        by_sid.setdefault(str(sid), []).append(int(order))
    ranks: dict[int, int] = {}
    for found in by_sid.values():
        for k, order in enumerate(sorted(found)[1:], start=1):
            ranks[order] = k
    return ranks


# --------------------------------------------------------------------------- validate
def _reject_row(sid: str, source: str, occurrence: int, code: str, message: str) -> dict[str, Any]:
    return {"structure_id": sid, "source": source, "occurrence": occurrence, "kind": REJECT,
            "reason": code, "message": message}


@dataclass(frozen=True, kw_only=True)
class ValidateStage:
    """Parse + validate raw rows; mark later duplicates; drop inputs already written (resume).

    Attributes:
        config: structure checks.
        ranks: ``{order: occurrence}`` of later duplicates (see :func:`duplicate_ranks`).
        done: ``(structure_id, occurrence)`` keys already written for this run.
    """

    config: ValidationConfig
    ranks: Mapping[int, int] = field(default_factory=dict)
    done: frozenset[tuple[str, int]] = frozenset()

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        t0 = time.perf_counter()
        out: list[dict[str, Any]] = []
        for raw in batch.to_dict("records"):
            sid, source = str(raw["structure_id"]), str(raw["source"])
            occurrence = int(self.ranks.get(int(raw["order"]), 0))
            if (sid, occurrence) in self.done:
                continue
            if occurrence:
                out.append(_reject_row(sid, source, occurrence, str(RejectCode.DUPLICATE_ID),
                                       f"structure_id {sid!r} already used by an earlier input "
                                       f"(this is occurrence {occurrence}); give every structure "
                                       "a unique id"))
                continue
            checked = validate_raw(raw, self.config)
            if isinstance(checked, Reject):
                out.append(_reject_row(sid, source, 0, str(checked.reason), checked.message))
            else:
                comp = checked.composition
                out.append({"structure_id": sid, "source": source, "occurrence": 0, "kind": VALID,
                            "formula": comp.reduced_formula, "chemsys": comp.chemical_system,
                            "nsites": len(checked), "structure": CompactStructure.from_structure(checked)})
        return _with_time(_frame(out), "t_validate", t0)


_BASE_COLUMNS = ("structure_id", "source", "occurrence", "kind", "reason", "message", "formula",
                 "chemsys", "nsites", "structure")


def _frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Rows as a DataFrame with at least the base columns (empty batches keep their columns)."""
    df = pd.DataFrame(rows)
    for col in _BASE_COLUMNS:
        if col not in df.columns:
            df[col] = pd.Series([None] * len(df), dtype=object)
    df["occurrence"] = df["occurrence"].fillna(0).astype(np.int64)
    df["nsites"] = df["nsites"].fillna(0).astype(np.int64)
    return df


def _with_time(df: pd.DataFrame, column: str, t0: float) -> pd.DataFrame:
    """Add ``column`` = elapsed seconds since ``t0`` split evenly over the rows."""
    df[column] = (time.perf_counter() - t0) / max(len(df), 1)
    return df


def _fail(df: pd.DataFrame, i: Any, message: str) -> None:
    """Turn row ``i`` of ``df`` into an inference_failed reject (in place)."""
    df.at[i, "kind"] = REJECT
    df.at[i, "reason"] = str(RejectCode.INFERENCE_FAILED)
    df.at[i, "message"] = message


def _short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return text if len(text) < 300 else text[:300] + "..."


# --------------------------------------------------------------------------- graphs
def count_edges(graph: Any) -> int:
    """Directed edges of a backbone graph: CHGNet ``atom_graph`` [E, 2] or PyG/MACE
    ``edge_index`` [2, E]; falls back to the atom count."""
    atom_graph = getattr(graph, "atom_graph", None)
    if atom_graph is not None:
        return int(atom_graph.shape[0])
    edge_index = getattr(graph, "edge_index", None)
    if edge_index is None and isinstance(graph, Mapping):
        edge_index = graph.get("edge_index")
    if edge_index is not None:
        return int(edge_index.shape[-1])
    return int(getattr(graph, "num_nodes", 1) or 1)


class GraphStage:
    """CPU stage: backbone graph, edge count, hull inputs (eV/atom), SOAP cluster, composition.

    Loads the backbone (for its own neighbour list), the reference hull and the model's SOAP
    clusterer once per actor. A structure whose graph or hull inputs fail becomes an
    ``inference_failed`` reject.
    """

    def __init__(self, *, model: str, references: str) -> None:
        from cathode_ray.data.references import ReferenceHull
        from cathode_ray.data.splits import SoapClusterer
        from cathode_ray.model.artifact import ModelDir
        from cathode_ray.model.backbones import load_backbone

        md = ModelDir(uri=model)
        manifest = md.read_manifest(verify=False)
        files = md.verify(manifest)
        self.backbone = load_backbone(manifest["backbone"]["spec"], device="cpu",
                                      expected_sha256=manifest["backbone"]["weights_sha256"])
        self.hull = ReferenceHull.from_source(references)
        soap = files.get("soap_clusterer.json")
        self.clusterer = None if soap is None else SoapClusterer.from_dict(json.loads(soap))

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        from cathode_ray.train.features import hull_inputs

        t0 = time.perf_counter()
        df = batch.reset_index(drop=True)
        n = len(df)
        graphs: list[Any] = [None] * n
        cols: dict[str, list[Any]] = {k: [None] * n for k in (
            "n_edges", "hull_pa", "corr_pa", "has_ref", "soap_cluster", "composition")}
        ok: list[int] = []
        structures: list[Any] = []  # pymatgen Structures
        for i in np.flatnonzero(df["kind"].to_numpy() == VALID):
            try:
                s = df.at[i, "structure"].to_structure()
                graph = self.backbone.build_graph(s)
                hull_pa, corr_pa, has_ref = hull_inputs([s], self.backbone, self.hull)
            except Exception as exc:  # noqa: BLE001 - one bad structure must not kill the batch
                _fail(df, i, f"graph/hull inputs failed ({_short(exc)})")
                continue
            graphs[i] = graph
            cols["n_edges"][i] = count_edges(graph)
            cols["hull_pa"][i], cols["corr_pa"][i] = float(hull_pa[0]), float(corr_pa[0])
            cols["has_ref"][i] = bool(has_ref[0])
            cols["composition"][i] = json.dumps(
                {el.symbol: float(a) for el, a in s.composition.fractional_composition.items()})
            ok.append(int(i))
            structures.append(s)
        for i, c in zip(ok, self._clusters(structures), strict=True):
            cols["soap_cluster"][i] = c
        df["graph"] = pd.Series(graphs, dtype=object)
        for k, v in cols.items():
            df[k] = pd.Series(v, dtype=object)
        df = df.drop(columns=["structure"])
        return _with_time(df, "t_graph", t0)

    def _clusters(self, structures: list[Any]) -> list[int | None]:
        if self.clusterer is None or not structures:
            return [None] * len(structures)
        try:
            return [int(c) for c in self.clusterer.assign(structures)]
        except Exception as exc:  # noqa: BLE001 - clusters only refine calibration
            log.warning("SOAP cluster assignment failed (%s); using global calibration", exc)
            return [None] * len(structures)


# --------------------------------------------------------------------------- inference
def edge_batches(n_edges: Sequence[int], max_edges: int) -> list[list[int]]:
    """Split positions 0..N-1 (in order) into sub-batches whose edge sums stay <= max_edges.

    A single structure with more edges than the budget gets a sub-batch of its own.
    """
    if max_edges < 1:
        raise ValueError(f"max_edges must be >= 1, got {max_edges}")
    batches: list[list[int]] = []
    current: list[int] = []
    total = 0
    for i, e in enumerate(n_edges):
        e = int(e)
        if current and total + e > max_edges:
            batches.append(current)
            current, total = [], 0
        current.append(i)
        total += e
    if current:
        batches.append(current)
    return batches


#: Fault injection for the reliability tests (docs/reliability.md). With both variables set, the
#: first inference actor that has finished N batches while the marker file does not exist creates
#: it and ends its own process (``os._exit(1)``) at the start of its next batch: once per marker.
FAULT_EXIT_AFTER_BATCHES_ENV = "CATHODE_RAY_FAULT_EXIT_AFTER_BATCHES"
FAULT_MARKER_ENV = "CATHODE_RAY_FAULT_MARKER"


def maybe_inject_actor_fault(batches_done: int) -> None:
    """Exit this process when the fault-injection variables ask for it (see above)."""
    after, marker = os.environ.get(FAULT_EXIT_AFTER_BATCHES_ENV), os.environ.get(FAULT_MARKER_ENV)
    if not after or not marker or batches_done < int(after):
        return
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    except FileExistsError:
        return
    log.error("fault injection: inference actor pid %d exits after %d batches", os.getpid(),
              batches_done)
    os._exit(1)


def check_device(device: str) -> None:
    """Raise a clear RuntimeError when ``device`` is CUDA and torch sees no CUDA device (a CPU
    build of torch on a GPU node, or a GPU that Ray scheduled but the process cannot see)."""
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(
            f"inference on {device!r}, but torch {torch.__version__} sees no CUDA device (CUDA build: "
            f"{torch.version.cuda}, CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); "
            "install a CUDA build of torch on the GPU nodes, or screen without --gpu-actors")


class InferenceStage:
    """Actor stage: ensemble inference (edge-budget sub-batches) then calibration/OOD/triage.

    The model is loaded and hash-verified once per actor (``Ensemble.load``). A sub-batch that
    raises is retried one structure at a time; structures that still fail become
    ``inference_failed`` rejects, never lost rows.
    """

    def __init__(self, *, model: str, device: str = "cpu",
                 max_edges: int = seedcard.MAX_EDGES_PER_BATCH_CPU,
                 run_id: str, precision: str = "float32", stack_members: bool = False,
                 compile_model: bool = False, threads: int | None = None) -> None:
        import torch

        from cathode_ray.calibrate.calibrator import Calibrator
        from cathode_ray.model.ensemble import Ensemble

        check_device(device)
        if threads is not None:  # else Ray's OMP_NUM_THREADS: the CPUs the actor reserves
            torch.set_num_threads(threads)
        retain_freed_memory()  # sub-batches reuse freed memory instead of faulting in new pages
        self.ensemble = Ensemble.load(model, device=device, precision=precision,
                                      stack_members=stack_members, compile_model=compile_model)
        self._precision_checked = precision == "float32"
        self._precision_lock = threading.Lock()  # a GPU actor takes two calls at once
        self.calibrator = Calibrator.from_files(self.ensemble.files, where=model)
        self.device = device
        self.max_edges = max_edges
        self.run_id = run_id
        self._batches = 0  # for maybe_inject_actor_fault

    def _predict(self, df: pd.DataFrame, idx: Sequence[int]) -> Any:
        import torch

        from cathode_ray.model.member import ThermoInputs

        rows = np.asarray(idx, dtype=np.int64)  # positions (the batch's index is 0..n-1)
        column = lambda name: df[name].to_numpy()[rows]  # noqa: E731 - whole columns, not df.at per row
        thermo = ThermoInputs(
            hull_pa=torch.from_numpy(column("hull_pa").astype(np.float32)),  # [B] eV/atom
            corr_pa=torch.from_numpy(column("corr_pa").astype(np.float32)),  # [B] eV/atom
            has_ref=torch.from_numpy(column("has_ref").astype(bool)),  # [B]
        )
        # the trunk's output stays on the device
        batch = self.ensemble.trunk_batch(list(column("graph")), self.device)
        if not self._precision_checked:
            with self._precision_lock:  # the other call waits for the verdict, then predicts with it
                if not self._precision_checked:
                    self._check_precision(batch, thermo)
        return self.ensemble.predict_batch(batch, thermo)

    def _check_precision(self, batch: Any, thermo: Any) -> None:
        """First sub-batch: reduced precision vs float32; fall back above the seed-card bound."""
        dev = self.ensemble.precision_deviation(batch, thermo)
        limit = seedcard.PRECISION_MAX_DEVIATION
        if dev > limit:
            log.warning("precision %s moves predictions by %.2g eV/atom (> %.0g) on %d structures: "
                        "this actor runs float32", self.ensemble.precision, dev, limit, len(thermo.has_ref))
            self.ensemble.precision = "float32"
        else:
            log.info("precision %s: max deviation %.2g eV/atom vs float32 on %d structures",
                     self.ensemble.precision, dev, len(thermo.has_ref))
        self._precision_checked = True  # only now: a second call must not predict before the verdict

    def _predict_robust(self, df: pd.DataFrame, idx: list[int]) -> list[tuple[list[int], Any]]:
        try:
            return [(idx, self._predict(df, idx))]
        except Exception as exc:  # noqa: BLE001 - fall back to one structure at a time
            if len(idx) == 1:
                _fail(df, idx[0], f"ensemble inference failed ({_short(exc)})")
                return []
            return [p for i in idx for p in self._predict_robust(df, [i])]

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        from cathode_ray.calibrate.calibrator import RESULT_COLUMNS
        from cathode_ray.model.prediction import EnsemblePrediction

        maybe_inject_actor_fault(self._batches)
        self._batches += 1
        t0 = time.perf_counter()
        df = batch.reset_index(drop=True)
        valid = [int(i) for i in np.flatnonzero(df["kind"].to_numpy() == VALID)]
        edges = df["n_edges"].to_numpy()[valid].astype(np.int64).tolist()
        parts: list[tuple[list[int], Any]] = []
        for sub in edge_batches(edges, self.max_edges):
            parts.extend(self._predict_robust(df, [valid[j] for j in sub]))
        t1 = time.perf_counter()
        result: dict[str, list[Any]] = {c: [None] * len(df) for c in
                                        (*RESULT_COLUMNS, "zero_shot_ehull", "has_reference")}
        if parts:
            rows = [i for idx, _ in parts for i in idx]
            pred = EnsemblePrediction.concat([p for _, p in parts])
            finite = pred.finite()  # [N]
            for j in np.flatnonzero(~finite):
                _fail(df, rows[j], "non-finite model output (NaN or inf in a member's quantiles "
                                   "or probabilities, or in the embedding)")
            if finite.any():
                keep = np.flatnonzero(finite)
                self._calibrate(df, [rows[j] for j in keep], pred.take(keep), result)
        for k, v in result.items():
            df[k] = pd.Series(v, dtype=object)
        df["model_id"] = self.ensemble.model_id
        df["run_id"] = self.run_id
        df = df.drop(columns=["graph"])
        n = max(len(df), 1)
        df["t_infer"] = (t1 - t0) / n
        df["t_calibrate"] = (time.perf_counter() - t1) / n
        return df

    def _calibrate(self, df: pd.DataFrame, rows: list[int], pred: Any,
                   result: dict[str, list[Any]]) -> None:
        clusters_raw = df["soap_cluster"].to_numpy()[rows]
        clusters = (None if any(c is None or pd.isna(c) for c in clusters_raw)
                    else np.asarray(clusters_raw, dtype=int))
        comps = [json.loads(c) for c in df["composition"].to_numpy()[rows]]
        try:
            cols = self.calibrator.apply(pred, clusters, comps)
        except Exception as exc:  # noqa: BLE001 - calibration failure rejects the rows
            for i in rows:
                _fail(df, i, f"calibration failed ({_short(exc)})")
            return
        for k, values in cols.items():
            for i, v in zip(rows, values, strict=True):
                result[k][i] = v.item() if hasattr(v, "item") else v
        zs = pred.zero_shot_ehull
        for j, i in enumerate(rows):
            result["zero_shot_ehull"][i] = None if not np.isfinite(zs[j]) else float(zs[j])
            result["has_reference"][i] = bool(pred.has_reference[j])


# --------------------------------------------------------------------------- output
def split_output(df: pd.DataFrame, *, run_id: str) -> tuple[pa.Table, pa.Table, dict[str, Any]]:
    """(results table, rejects table, stats) of a batch of final rows, schemas enforced."""
    stats: dict[str, Any] = {s: float(df[s].fillna(0).sum()) if s in df.columns else 0.0
                             for s in STAGE_TIMES}
    stats["rows"] = len(df)
    is_result = (df["kind"] == VALID).to_numpy() if len(df) else np.zeros(0, dtype=bool)
    res = df.loc[is_result]
    rej = df.loc[~is_result].copy()
    rej["run_id"] = run_id
    rej["message"] = rej["message"].fillna("")
    rej["reason"] = rej["reason"].fillna(str(RejectCode.INFERENCE_FAILED))
    res_table = conform(_to_arrow(res, RESULT_SCHEMA), RESULT_SCHEMA)
    rej_table = conform(_to_arrow(rej, SCREEN_REJECT_SCHEMA), SCREEN_REJECT_SCHEMA)
    return res_table, rej_table, stats


def _to_arrow(df: pd.DataFrame, schema: pa.Schema) -> pa.Table:
    cols = {}
    for f in schema:
        if f.name in df.columns:
            values = [None if (v is None or (isinstance(v, float) and np.isnan(v))
                               and not pa.types.is_floating(f.type)) else v
                      for v in df[f.name].tolist()]
            cols[f.name] = pa.array(values, type=f.type, from_pandas=True)
    return pa.table(cols) if cols else pa.table({})


#: Rows per results / rejects file pair (``ScreenConfig.min_rows_per_file``): ~10 MB of results.
ROWS_PER_FILE: int = 20_000


#: Fault injection for the driver-kill test: with this set to N, the driver stops (sleeps until
#: it is killed) once it has written N file pairs, so that a test can kill it mid-run for certain.
FAULT_HANG_AFTER_FILES_ENV = "CATHODE_RAY_FAULT_HANG_AFTER_FILES"


def maybe_hang_driver(files_written: int) -> None:
    """Sleep until killed when ``FAULT_HANG_AFTER_FILES_ENV`` asks for it (see above)."""
    after = os.environ.get(FAULT_HANG_AFTER_FILES_ENV)
    if not after or files_written < int(after):
        return
    log.error("fault injection: driver pid %d stops after %d files; kill it", os.getpid(),
              files_written)
    while True:
        time.sleep(60)


class ScreenWriter:
    """Two-way Parquet writer: result rows to ``results_uri``, rejects to ``rejects_uri``.

    The driver feeds it the pipeline's output in small batches (``pipeline._DRIVER_BATCH_ROWS``);
    each batch is converted to Arrow at once and held until ``rows_per_file`` rows are gathered,
    then written as at most one results file and one rejects file named
    ``part-<attempt>-<seq>.parquet`` (sensible file sizes). Arrow holds a row in ~0.3 KiB, where
    a gathered pandas batch cost the driver ~1.5 KiB of heap per row (docs/performance.md).
    Writing where the output is consumed needs no write-task process (~0.2 GB each, started per
    file by a ``Datasink``). Call :meth:`flush` after the last batch. ``stats`` sums the
    per-batch statistics (rows, results, rejects, busy seconds per stage) as batches arrive.
    ``check`` (the run lock's :meth:`~cathode_ray.screen.state.ExpiringLock.check`) runs before
    every file pair and raises to stop a run whose lock another process has taken over.
    """

    def __init__(self, *, results_uri: str, rejects_uri: str, run_id: str,
                 attempt: str | None = None, rows_per_file: int = ROWS_PER_FILE,
                 check: Callable[[], None] | None = None) -> None:
        if rows_per_file < 1:
            raise ValueError(f"rows_per_file must be >= 1, got {rows_per_file}")
        self.results_fs, self.results_path = filesystem_for(results_uri)
        self.rejects_fs, self.rejects_path = filesystem_for(rejects_uri)
        self.run_id = run_id
        self.attempt = attempt or uuid.uuid4().hex[:12]
        self.rows_per_file = rows_per_file
        self.check = check
        self.files = 0
        self.stats: dict[str, Any] = {"rows": 0, "results": 0, "rejects": 0}
        self._pending: list[tuple[pa.Table, pa.Table]] = []  # (results, rejects) not yet written
        self._pending_rows = 0

    def write(self, df: pd.DataFrame) -> None:
        """Take one batch of final rows (results and rejects mixed); writes a file pair once
        ``rows_per_file`` rows are gathered."""
        if not len(df):
            return
        res, rej, stats = split_output(df, run_id=self.run_id)
        self._pending.append((res, rej))
        self._pending_rows += len(df)
        stats.update(results=res.num_rows, rejects=rej.num_rows)
        for k, v in stats.items():
            self.stats[k] = self.stats.get(k, 0) + v
        if self._pending_rows >= self.rows_per_file:
            self.flush()

    def flush(self) -> None:
        """Write the gathered rows (if any) as one results file and one rejects file."""
        if not self._pending:
            return
        res = pa.concat_tables([r for r, _ in self._pending])
        rej = pa.concat_tables([r for _, r in self._pending])
        name = f"part-{self.attempt}-{self.files:06d}.parquet"
        if self.check is not None:
            self.check()
        if res.num_rows:
            write_parquet(res, self.results_fs, f"{self.results_path}/{name}")
        if rej.num_rows:
            write_parquet(rej, self.rejects_fs, f"{self.rejects_path}/{name}")
        self.files += 1
        self._pending, self._pending_rows = [], 0
        maybe_hang_driver(self.files)
