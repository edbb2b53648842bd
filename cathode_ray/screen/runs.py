"""Run bookkeeping for screening: run ids, the DEST layout, locks, run manifests and resume state.

DEST layout (local path or ``s3://bucket/prefix``)::

    DEST/results/run_id=RUN/part-*.parquet   result rows (schema.RESULT_SCHEMA)
    DEST/rejects/run_id=RUN/part-*.parquet   reject rows (schema.SCREEN_REJECT_SCHEMA)
    DEST/_runs/RUN.json                      run manifest (one entry per attempt)
    DEST/_runs/RUN.lock                      held while a run (or resume) of RUN is active

Locks are created atomically: ``O_CREAT | O_EXCL`` locally, an S3 conditional PUT
(``If-None-Match: *``) on S3. A lock names its owner and expires ``ttl_s`` after its last
heartbeat (a background thread refreshes it), so a crashed run can be resumed once the lock has
expired, or at once from the same host when the owning process is gone. Taking over an expired
lock deletes it and creates a new one conditionally; two processes that both saw the same
expired lock can race between the delete and the create (documented window, seconds wide).
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlparse

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from cathode_ray.storage import filesystem_for, join, s3_client

log = logging.getLogger(__name__)

_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class RunLockedError(RuntimeError):
    """Another process holds the lock of this run id."""


def new_run_id() -> str:
    """A fresh run id: UTC timestamp plus 8 random hex digits (sortable, unique)."""
    return f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"


def check_run_id(run_id: str) -> str:
    """``run_id`` when it is safe in paths and object keys, else ValueError."""
    if not _RUN_ID.match(run_id):
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


def delete(uri: str) -> None:
    """Delete a file/object if it exists."""
    fs, path = filesystem_for(uri)
    try:
        fs.delete_file(path)
    except FileNotFoundError:
        pass
    except OSError as exc:  # S3 reports a missing key as a generic OSError on some versions
        if fs.get_file_info(path).type != pafs.FileType.NotFound:
            raise exc


# --------------------------------------------------------------------------- locks
def _create_exclusive(uri: str, data: bytes) -> bool:
    """Create ``uri`` only if absent (atomically). True when created, False when it existed."""
    if uri.startswith("s3://"):
        return _s3_create_exclusive(uri, data)
    fs, path = filesystem_for(uri)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    return True


def _s3_create_exclusive(uri: str, data: bytes) -> bool:
    """S3 conditional create (``If-None-Match: *``); False on 412 Precondition Failed."""
    from botocore.exceptions import ClientError

    parsed = urlparse(uri)
    try:
        s3_client().put_object(Bucket=parsed.netloc, Key=parsed.path.lstrip("/"), Body=data,
                                IfNoneMatch="*")
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412):
            return False
        raise
    return True


@dataclass(kw_only=True)
class RunLock:
    """An exclusive, expiring lock on one run id (see the module docstring).

    Use as a context manager; :meth:`acquire` raises :class:`RunLockedError` when another live
    owner holds it. ``ttl_s`` is seconds without heartbeat before the lock counts as abandoned.
    """

    uri: str
    run_id: str
    ttl_s: float = 600.0
    owner: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}:"
                       f"{uuid.uuid4().hex[:8]}")
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.ttl_s <= 0:
            raise ValueError(f"ttl_s must be > 0 s, got {self.ttl_s}")

    def _body(self) -> bytes:
        now = time.time()
        return json.dumps({"run_id": self.run_id, "owner": self.owner, "host": socket.gethostname(),
                           "pid": os.getpid(), "heartbeat": now, "expires": now + self.ttl_s,
                           "created": utc_now()}).encode()

    def acquire(self) -> RunLock:
        """Take the lock (taking over an abandoned one) and start the heartbeat thread."""
        if not _create_exclusive(self.uri, self._body()):
            held = read_json(self.uri)
            if held is not None and not _abandoned(held):
                raise RunLockedError(
                    f"run {self.run_id!r} is already running (lock {self.uri} held by "
                    f"{held.get('owner')} until {datetime.fromtimestamp(held['expires'], UTC):%c} "
                    "UTC); wait for it, or pick another --run-id")
            log.warning("taking over abandoned lock %s (owner %s)", self.uri,
                        (held or {}).get("owner"))
            delete(self.uri)  # race window: see module docstring
            if not _create_exclusive(self.uri, self._body()):
                raise RunLockedError(f"run {self.run_id!r}: lost the race for lock {self.uri}")
        self._thread = threading.Thread(target=self._heartbeat, name="run-lock-heartbeat",
                                        daemon=True)
        self._thread.start()
        return self

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                held = read_json(self.uri)
                if held is None or held.get("owner") != self.owner:
                    log.error("lock %s was taken by %s", self.uri, (held or {}).get("owner"))
                    return
                fs, path = filesystem_for(self.uri)
                with fs.open_output_stream(path) as fh:
                    fh.write(self._body())
            except OSError as exc:  # transient storage error: try again next beat
                log.warning("lock heartbeat failed: %s", exc)

    def release(self) -> None:
        """Stop the heartbeat and delete the lock if this owner still holds it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            held = read_json(self.uri)
            if held is not None and held.get("owner") == self.owner:
                delete(self.uri)
        except OSError as e:  # storage unreachable: keep the original error; the lock expires
            log.warning("could not release run lock %s (%s); it expires after its ttl or when "
                        "this process has exited", self.uri, e)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _abandoned(held: dict[str, Any]) -> bool:
    """True when a lock expired, or its owner ran on this host and is no longer alive."""
    if float(held.get("expires", 0)) < time.time():
        return True
    if held.get("host") == socket.gethostname():
        try:
            os.kill(int(held["pid"]), 0)
        except ProcessLookupError:
            return True
        except (PermissionError, KeyError, ValueError):
            return False
    return False


# --------------------------------------------------------------------------- resume state
def _parquet_files(uri: str) -> tuple[pafs.FileSystem, list[str]]:
    fs, path = filesystem_for(uri)
    selector = pafs.FileSelector(path, recursive=True, allow_not_found=True)
    files = sorted(i.path for i in fs.get_file_info(selector)
                   if i.type == pafs.FileType.File and i.path.endswith(".parquet"))
    return fs, files


def read_columns(uri: str, columns: list[str], *, drop_corrupt: bool = False) -> dict[str, list]:
    """Columns of every Parquet file under ``uri`` (empty lists when there is none).

    With ``drop_corrupt`` an unreadable file (an interrupted local write) is deleted, so that a
    resume redoes its rows; otherwise it raises.
    """
    fs, files = _parquet_files(uri)
    out: dict[str, list] = {c: [] for c in columns}
    for path in files:
        try:
            table = pq.read_table(path, filesystem=fs, columns=columns, partitioning=None)
        except (OSError, ValueError) as exc:
            if not drop_corrupt:
                raise
            log.warning("deleting unreadable output file %s (%s); its rows will be redone",
                        path, exc)
            fs.delete_file(path)
            continue
        for c in columns:
            out[c].extend(table.column(c).to_pylist())
    return out


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
