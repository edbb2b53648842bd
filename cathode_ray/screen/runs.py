"""Run bookkeeping for screening: run ids, the DEST layout, locks, run manifests and resume state.

DEST layout (local path or ``s3://bucket/prefix``)::

    DEST/results/run_id=RUN/part-*.parquet   result rows (schema.RESULT_SCHEMA)
    DEST/rejects/run_id=RUN/part-*.parquet   reject rows (schema.SCREEN_REJECT_SCHEMA)
    DEST/_runs/RUN.json                      run manifest (one entry per attempt)
    DEST/_runs/RUN.start                     JSON written before the run's first row: library
                                             (spec + fingerprint) and model that a resume must match
    DEST/_runs/RUN.lock                      held while a run (or resume) of RUN is active

A run lock is an :class:`~cathode_ray.screen.state.ExpiringLock` (atomic create; names its
owner; expires ``ttl_s`` after its last heartbeat; compare-and-swap take-over), so a crashed run
can be resumed once the lock has expired, or at once from the same host when the owning process
is gone.

Read a screen's output with :func:`read_results` / :func:`read_rejects` (one run or every run of
a DEST, as one Arrow table; ``.to_pandas()`` for a DataFrame).
"""

from __future__ import annotations

import json
import logging
import os
import re
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from cathode_ray.screen.state import ExpiringLock
from cathode_ray.storage import IN_PROGRESS_SUFFIX, filesystem_for, join

log = logging.getLogger(__name__)

#: Whole run id (``fullmatch``: with ``re.match`` and ``$``, "abc\n" passed, since ``$`` also
#: matches before a trailing newline).
_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class RunLockedError(RuntimeError):
    """Another process holds the lock of this run id."""


def new_run_id() -> str:
    """A fresh run id: UTC timestamp plus 8 random hex digits (sortable, unique)."""
    return f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"


def check_run_id(run_id: str) -> str:
    """``run_id`` when it is safe in paths and object keys, else ValueError."""
    if not _RUN_ID.fullmatch(run_id):
        raise ValueError(f"run id {run_id!r} must be 1-128 characters of letters, digits, '.', "
                         "'_' or '-', starting with a letter or digit")
    return run_id


def utc_now() -> str:
    """Current UTC time, ISO 8601."""
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass(frozen=True, kw_only=True)
class RunPaths:
    """Where one run's output lives under DEST (URIs, local path or s3://)."""

    dest: str
    run_id: str

    @property
    def results(self) -> str:
        return join(self.dest, "results", f"run_id={self.run_id}")

    @property
    def rejects(self) -> str:
        return join(self.dest, "rejects", f"run_id={self.run_id}")

    @property
    def manifest(self) -> str:
        return join(self.dest, "_runs", f"{self.run_id}.json")

    @property
    def lock(self) -> str:
        return join(self.dest, "_runs", f"{self.run_id}.lock")

    @property
    def start(self) -> str:
        """The start record (JSON). Not ``*.json``: run id ``X.start`` has manifest
        ``X.start.json``, which must not be run ``X``'s record."""
        return join(self.dest, "_runs", f"{self.run_id}.start")


# --------------------------------------------------------------------------- small IO helpers
def read_json(uri: str) -> dict[str, Any] | None:
    """JSON object at ``uri`` or None when it does not exist."""
    fs, path = filesystem_for(uri)
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as fh:
        return json.loads(fh.read())


def write_json(uri: str, obj: dict[str, Any]) -> None:
    """Write ``obj`` as JSON to ``uri`` (parents created; S3 PUTs are atomic)."""
    fs, path = filesystem_for(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    data = json.dumps(obj, indent=2, sort_keys=True, default=str).encode()
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
        return
    with fs.open_output_stream(path) as fh:
        fh.write(data)


# --------------------------------------------------------------------------- locks
@dataclass(kw_only=True)
class RunLock(ExpiringLock):
    """The lock of one run id at ``uri`` (``RunPaths.lock``); raises :class:`RunLockedError`
    while another live owner runs the same id. Same storage rules as the re-screen lock
    (:class:`cathode_ray.screen.state.ExpiringLock`)."""

    run_id: str
    ttl_s: float = 600.0

    def body(self) -> dict[str, Any]:
        return {**super().body(), "run_id": self.run_id}

    def busy_error(self, held: dict[str, Any] | None) -> Exception:
        held = held or {}
        return RunLockedError(
            f"run {self.run_id!r} is already running (lock {self.uri} held by "
            f"{held.get('owner', '?')} until {held.get('expires_at_iso', '?')} UTC); wait for it, "
            "or pick another --run-id")


# --------------------------------------------------------------------------- resume state
def _parquet_files(uri: str, *, delete_in_progress: bool = False
                   ) -> tuple[pafs.FileSystem, list[str]]:
    fs, path = filesystem_for(uri)
    selector = pafs.FileSelector(path, recursive=True, allow_not_found=True)
    paths = sorted(i.path for i in fs.get_file_info(selector) if i.type == pafs.FileType.File)
    if delete_in_progress:
        for p in paths:
            if p.endswith(IN_PROGRESS_SUFFIX):
                log.warning("deleting %s, left by an interrupted write", p)
                fs.delete_file(p)
    return fs, [p for p in paths if p.endswith(".parquet")]


def read_columns(uri: str, columns: list[str], *, drop_corrupt: bool = False) -> dict[str, list]:
    """Columns of every Parquet file under ``uri`` (empty lists when there is none).

    With ``drop_corrupt`` (a resume, which holds the run's lock) the temporaries of interrupted
    writes and any file that is not valid Parquet are deleted, so that their rows are redone;
    otherwise such a file raises. Storage errors (``OSError``: unreachable, access denied) always
    raise: the file may be fine, and deleting it would throw away its rows.
    """
    fs, files = _parquet_files(uri, delete_in_progress=drop_corrupt)
    out: dict[str, list] = {c: [] for c in columns}
    for path in files:
        try:
            table = pq.read_table(path, filesystem=fs, columns=columns, partitioning=None)
        except ValueError as exc:  # pyarrow.ArrowInvalid: not a Parquet file, truncated
            if not drop_corrupt:
                raise
            log.warning("deleting unreadable output file %s (%s); its rows will be redone",
                        path, exc)
            fs.delete_file(path)
            continue
        for c in columns:
            out[c].extend(table.column(c).to_pylist())
    return out


def read_tables(uri: str, schema: pa.Schema) -> pa.Table:
    """Every Parquet file under ``uri`` (local or s3://), each conformed to ``schema``, as one table
    (empty, with that schema, when there is none). Files are read with ``partitioning=None``:
    ``run_id`` is a column of every file, not only a ``run_id=`` folder."""
    from cathode_ray.screen.schema import conform

    fs, files = _parquet_files(uri)
    tables = [conform(pq.read_table(p, filesystem=fs, partitioning=None), schema) for p in files]
    return pa.concat_tables(tables) if tables else schema.empty_table()


def read_results(dest: str, run_id: str | None = None) -> pa.Table:
    """Result rows (:data:`~cathode_ray.screen.schema.RESULT_SCHEMA`) of run ``run_id`` in DEST,
    or of every run there when ``None``; energies in eV/atom. ``.to_pandas()`` for a DataFrame."""
    from cathode_ray.screen.schema import RESULT_SCHEMA

    uri = RunPaths(dest=dest, run_id=run_id).results if run_id else join(dest, "results")
    return read_tables(uri, RESULT_SCHEMA)


def read_rejects(dest: str, run_id: str | None = None) -> pa.Table:
    """Reject rows (:data:`~cathode_ray.screen.schema.SCREEN_REJECT_SCHEMA`: id, source, reason,
    message, occurrence, run_id) of run ``run_id`` in DEST, or of every run there when ``None``."""
    from cathode_ray.screen.schema import SCREEN_REJECT_SCHEMA

    uri = RunPaths(dest=dest, run_id=run_id).rejects if run_id else join(dest, "rejects")
    return read_tables(uri, SCREEN_REJECT_SCHEMA)


def done_keys(paths: RunPaths) -> set[tuple[str, int]]:
    """(structure_id, occurrence) of every input already written for this run."""
    res = read_columns(paths.results, ["structure_id"], drop_corrupt=True)
    rej = read_columns(paths.rejects, ["structure_id", "occurrence"], drop_corrupt=True)
    keys = {(sid, 0) for sid in res["structure_id"]}
    keys.update(zip(rej["structure_id"], (int(o) for o in rej["occurrence"]), strict=True))
    return keys


def count_values(values: Iterable[str]) -> dict[str, int]:
    """Occurrences per value, sorted by value."""
    counts: dict[str, int] = {}
    for v in values:
        counts[str(v)] = counts.get(str(v), 0) + 1
    return dict(sorted(counts.items()))


def output_stats(paths: RunPaths) -> dict[str, Any]:
    """Counts and duplicate check of everything written for a run (results + rejects)."""
    res = read_columns(paths.results, ["structure_id", "decision"])
    rej = read_columns(paths.rejects, ["structure_id", "reason", "occurrence"])
    keys = [(s, 0) for s in res["structure_id"]]
    keys += list(zip(rej["structure_id"], (int(o) for o in rej["occurrence"]), strict=True))
    return {
        "n_results": len(res["structure_id"]),
        "n_rejects": len(rej["structure_id"]),
        "decisions": count_values(res["decision"]),
        "reject_reasons": count_values(rej["reason"]),
        "duplicate_result_ids": len(res["structure_id"]) - len(set(res["structure_id"])),
        "duplicate_inputs": len(keys) - len(set(keys)),
    }
