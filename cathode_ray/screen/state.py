"""Durable state for scheduled re-screens (``cathode-ray rescreen``), and the expiring lock that
re-screens and screen runs (:mod:`.runs`) hold.

The state directory (default ``DEST/_state``; local path or ``s3://bucket/prefix``) holds::

    local                                   S3
    STATE/state.json   the current state    STATE/state-00000001-<rand>.json, state-00000002-...
                                            STATE/CURRENT  {"key": "state-00000002-...", "seq": 2}
    STATE/LOCK         held while a re-screen runs (owner, host, pid, expires_at)

**Atomic state writes.** Locally the new state is written to a temporary file in the same
directory, fsynced, and moved over ``state.json`` with :func:`os.replace` (atomic on POSIX). On S3
each write is a *new* versioned key (sequence number + random suffix, created with
``If-None-Match: *``), and only then is the small ``CURRENT`` pointer replaced with a conditional
PUT (``If-Match`` on the ETag read before, or ``If-None-Match: *`` for the first one), so of two
concurrent writers exactly one commits. A crash at any point leaves readers on the previous
complete state; an orphaned versioned key is harmless (never pointed at; safe to delete).

**Lock** (:class:`ExpiringLock`: ``STATE/LOCK`` here, ``DEST/_runs/RUN.lock`` for a screen run).
The lock object is created atomically: under a file lock locally, a conditional
``PutObject(IfNoneMatch="*")`` on S3 (supported by AWS S3 since 2024 and by moto). It names its
owner and expires ``ttl_s`` after its last refresh (a daemon thread refreshes it every
``ttl_s / 3``). A lock that has expired, or whose owner ran on this host and is gone, may be
taken over:

* S3: a conditional PUT with ``If-Match: <ETag of the expired lock>`` - a compare-and-swap, so of
  two processes taking over the same expired lock exactly one wins. Refreshes use ``If-Match`` on
  the ETag this owner last wrote (a lost lock is noticed) and release is a conditional DELETE.
* local: every acquire, refresh and release holds an exclusive ``flock`` on ``<lock>.guard``
  while it reads and replaces the lock file (temporary file + :func:`os.replace`), so readers never
  see a half-written lock and of two processes taking over an expired lock exactly one wins. A lock
  file that cannot be parsed counts as live until ``ttl_s`` after its modification time.

Nothing here imports boto3 or touches storage at import time.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Self
from urllib.parse import urlparse

from cathode_ray.storage import is_remote, s3_client

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
POINTER = "CURRENT"
LOCK = "LOCK"
#: Version of the state document layout.
STATE_FORMAT = 1


class StateError(RuntimeError):
    """The state could not be read or written consistently (e.g. a concurrent writer)."""


class RescreenBusy(RuntimeError):
    """Another re-screen holds the lock; the message names the owner and when it expires."""


class LockLost(RuntimeError):
    """This owner's lock was taken over (it had expired) while its holder was running."""


def utc_iso(ts: float | None = None) -> str:
    """``ts`` (epoch seconds, default now) as an ISO 8601 UTC string."""
    moment = datetime.now(UTC) if ts is None else datetime.fromtimestamp(ts, UTC)
    return moment.isoformat(timespec="seconds")


# --------------------------------------------------------------------------- S3 helpers
def _is_s3(uri: str) -> bool:
    return is_remote(uri)


def _bucket_key(uri: str) -> tuple[str, str]:
    parsed = urlparse(uri)
    return parsed.netloc, parsed.path.lstrip("/")


def _precondition_failed(exc: Exception) -> bool:
    """True for an S3 conditional-request failure (412, or 409 conflicting conditional write)."""
    response = getattr(exc, "response", None) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412)


def _not_found(exc: Exception) -> bool:
    response = getattr(exc, "response", None) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code in ("NoSuchKey", "404", "NotFound") or status == 404


def s3_get(uri: str) -> tuple[bytes, str] | None:
    """(body, ETag) of an S3 object, or None when it does not exist."""
    from botocore.exceptions import ClientError

    bucket, key = _bucket_key(uri)
    try:
        obj = s3_client().get_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        if _not_found(exc):
            return None
        raise
    return obj["Body"].read(), str(obj["ETag"])


def s3_put(uri: str, data: bytes, *, if_match: str | None = None,
           if_none_match: bool = False) -> str | None:
    """Conditional PUT; the new ETag, or None when the precondition failed."""
    from botocore.exceptions import ClientError

    bucket, key = _bucket_key(uri)
    kwargs: dict[str, Any] = {"Bucket": bucket, "Key": key, "Body": data}
    if if_match is not None:
        kwargs["IfMatch"] = if_match
    if if_none_match:
        kwargs["IfNoneMatch"] = "*"
    try:
        return str(s3_client().put_object(**kwargs)["ETag"])
    except ClientError as exc:
        if _precondition_failed(exc) or (if_match is not None and _not_found(exc)):
            return None
        raise


def s3_delete(uri: str, *, if_match: str | None = None) -> bool:
    """Delete an object (only if its ETag matches, when given); False if that failed."""
    from botocore.exceptions import ClientError

    bucket, key = _bucket_key(uri)
    kwargs: dict[str, Any] = {"Bucket": bucket, "Key": key}
    if if_match is not None:
        kwargs["IfMatch"] = if_match
    try:
        s3_client().delete_object(**kwargs)
    except ClientError as exc:
        if _precondition_failed(exc) or _not_found(exc):
            return False
        raise
    return True


# --------------------------------------------------------------------------- local helpers
def _local_path(uri: str) -> str:
    """Absolute path of a local path or ``file://`` URI."""
    if uri.lower().startswith("file://"):
        uri = urlparse(uri).path
    return os.path.abspath(os.path.expanduser(uri))


def write_atomic_local(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` via a fsynced temp file in the same directory + os.replace."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    _fsync_dir(directory)


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _read_local_json(path: str) -> dict[str, Any] | None:
    try:
        with open(path, "rb") as fh:
            return json.loads(fh.read())
    except FileNotFoundError:
        return None


def _dumps(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, indent=2, sort_keys=True, default=str).encode()


# --------------------------------------------------------------------------- state store
@dataclass(frozen=True, kw_only=True)
class StateStore:
    """The re-screen state under ``uri`` (a directory / S3 prefix); see the module docstring.

    The state is a JSON object; :meth:`write` stamps ``format``, ``seq`` and ``written_at``.
    """

    uri: str

    def __post_init__(self) -> None:
        if not self.uri:
            raise ValueError("state uri must be given")

    def _child(self, name: str) -> str:
        return f"{self.uri.rstrip('/')}/{name}"

    def read(self) -> dict[str, Any] | None:
        """The last committed state, or None when there is none yet.

        Raises:
            StateError: the S3 pointer names a state object that does not exist.
        """
        if not _is_s3(self.uri):
            return _read_local_json(_local_path(self._child(STATE_FILE)))
        pointer = self._read_pointer()
        if pointer is None:
            return None
        found = s3_get(self._child(str(pointer[0]["key"])))
        if found is None:
            raise StateError(f"{self._child(POINTER)} points at {pointer[0]['key']}, which "
                             "does not exist; restore it or point CURRENT at an existing state")
        return json.loads(found[0])

    def _read_pointer(self) -> tuple[dict[str, Any], str] | None:
        found = s3_get(self._child(POINTER))
        return None if found is None else (json.loads(found[0]), found[1])

    def write(self, state: dict[str, Any]) -> str:
        """Commit ``state`` atomically; returns the URI of the written state document.

        Raises:
            StateError: on S3, another writer committed concurrently (no state is lost: the
                other writer's state stays current).
        """
        if not _is_s3(self.uri):
            path = _local_path(self._child(STATE_FILE))
            previous = _read_local_json(path) or {}
            doc = self._stamp(state, int(previous.get("seq", 0)) + 1)
            write_atomic_local(path, _dumps(doc))
            return path
        return self._write_s3(state)

    @staticmethod
    def _stamp(state: dict[str, Any], seq: int) -> dict[str, Any]:
        return {**state, "format": STATE_FORMAT, "seq": seq, "written_at": utc_iso()}

    def _write_s3(self, state: dict[str, Any]) -> str:
        pointer = self._read_pointer()
        seq = int(pointer[0].get("seq", 0)) + 1 if pointer else 1
        key = f"state-{seq:08d}-{uuid.uuid4().hex[:8]}.json"
        uri = self._child(key)
        if s3_put(uri, _dumps(self._stamp(state, seq)), if_none_match=True) is None:
            raise StateError(f"{uri} already exists: another re-screen is writing the state")
        body = _dumps({"key": key, "seq": seq, "written_at": utc_iso()})
        etag = pointer[1] if pointer else None
        done = s3_put(self._child(POINTER), body, if_match=etag, if_none_match=etag is None)
        if done is None:
            raise StateError(f"{self._child(POINTER)} changed while writing {key}: another "
                             "re-screen committed concurrently; the state stays at its write")
        return uri


# --------------------------------------------------------------------------- lock
def _default_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def lock_is_stale(held: dict[str, Any], *, now: float | None = None) -> bool:
    """True when a lock expired, or its owner ran on this host and its process is gone."""
    if float(held.get("expires_at", 0)) < (time.time() if now is None else now):
        return True
    if held.get("host") == socket.gethostname():
        try:
            os.kill(int(held["pid"]), 0)
        except ProcessLookupError:
            return True
        except (PermissionError, KeyError, ValueError, TypeError):
            return False
    return False


@dataclass(kw_only=True)
class ExpiringLock:
    """Exclusive, expiring lock object at ``uri`` (local path or ``s3://``; see the module
    docstring). Screen runs (:class:`cathode_ray.screen.runs.RunLock`) and re-screens
    (:class:`StateLock`) both use it.

    Use as a context manager. :meth:`acquire` raises :meth:`busy_error` while another live owner
    holds it. ``ttl_s``: seconds without refresh before the lock counts as abandoned.
    ``heartbeat=False`` skips the refresh thread (tests, short holds).
    """

    uri: str
    ttl_s: float = 3600.0
    owner: str = field(default_factory=_default_owner)
    heartbeat: bool = True
    _etag: str | None = field(default=None, repr=False)
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.ttl_s > 0:
            raise ValueError(f"ttl_s must be > 0 s, got {self.ttl_s}")

    @property
    def lock_uri(self) -> str:
        """URI of the lock object."""
        return self.uri

    def body(self) -> dict[str, Any]:
        """The lock document for now: owner, host, pid, acquired/expiry times."""
        now = time.time()
        return {"owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(),
                "refreshed_at": utc_iso(now), "expires_at": now + self.ttl_s,
                "expires_at_iso": utc_iso(now + self.ttl_s)}

    def busy_error(self, held: dict[str, Any] | None) -> Exception:
        """The error :meth:`acquire` raises when ``held`` (another owner's lock) is live."""
        held = held or {}
        return RuntimeError(f"lock {self.lock_uri} is held by {held.get('owner', '?')} until "
                            f"{held.get('expires_at_iso', '?')} (UTC)")

    def read(self) -> dict[str, Any] | None:
        """The lock document currently stored (anyone's), or None."""
        if _is_s3(self.uri):
            found = s3_get(self.lock_uri)
            return None if found is None else json.loads(found[0])
        return self._read_local(_local_path(self.lock_uri))

    # -- acquire -----------------------------------------------------------------------------
    def acquire(self) -> Self:
        """Take the lock (taking over a stale one) and start the refresh thread.

        Raises:
            Exception: :meth:`busy_error` when another owner holds a live lock.
        """
        taken = self._acquire_s3() if _is_s3(self.uri) else self._acquire_local()
        if not taken:
            raise self.busy_error(self.read())
        if self.heartbeat:
            self._stop.clear()
            self._thread = threading.Thread(target=self._refresh_loop, daemon=True,
                                            name="lock-refresh")
            self._thread.start()
        return self

    def _acquire_s3(self) -> bool:
        data = _dumps(self.body())
        etag = s3_put(self.lock_uri, data, if_none_match=True)
        if etag is None:
            found = s3_get(self.lock_uri)
            if found is None:  # released in between: try once more
                etag = s3_put(self.lock_uri, data, if_none_match=True)
            elif lock_is_stale(json.loads(found[0])):
                log.warning("taking over stale lock %s", self.lock_uri)
                etag = s3_put(self.lock_uri, data, if_match=found[1])
        self._etag = etag
        return etag is not None

    @contextlib.contextmanager
    def _guard(self) -> Iterator[str]:
        """Hold the exclusive file lock beside the local lock file; yields the lock's path."""
        path = _local_path(self.lock_uri)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        while True:
            fd = os.open(f"{path}.guard", os.O_CREAT | os.O_RDWR, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:  # release deletes the guard: hold it only if it is still the file at the path
                if os.stat(f"{path}.guard").st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        try:
            yield path
        finally:
            os.close(fd)  # releases the flock

    def _read_local(self, path: str) -> dict[str, Any] | None:
        """The lock file's document; an unreadable one (torn by a crash, hand-edited) counts
        as held by an unknown owner until ``ttl_s`` after it was last modified."""
        try:
            with open(path, "rb") as fh:
                return json.loads(fh.read())
        except FileNotFoundError:
            return None
        except ValueError:  # JSONDecodeError and UnicodeDecodeError included
            try:
                expires = os.stat(path).st_mtime + self.ttl_s
            except FileNotFoundError:
                return None
            return {"owner": "unknown (unreadable lock file)", "expires_at": expires,
                    "expires_at_iso": utc_iso(expires)}

    def _acquire_local(self) -> bool:
        with self._guard() as path:
            held = self._read_local(path)
            if held is not None and not lock_is_stale(held):
                return False
            if held is not None:
                log.warning("taking over stale lock %s (owner %s)", path, held.get("owner"))
            write_atomic_local(path, _dumps(self.body()))
            return True

    # -- refresh / release --------------------------------------------------------------------
    def refresh(self) -> None:
        """Extend the expiry by ``ttl_s``.

        Raises:
            LockLost: the lock is no longer this owner's.
        """
        if _is_s3(self.uri):
            etag = s3_put(self.lock_uri, _dumps(self.body()), if_match=self._etag)
            if etag is None:
                raise LockLost(f"lock {self.lock_uri} was taken over")
            self._etag = etag
            return
        with self._guard() as path:
            held = self._read_local(path)
            if held is None or held.get("owner") != self.owner:
                raise LockLost(f"lock {self.lock_uri} was taken over by "
                               f"{(held or {}).get('owner')}")
            write_atomic_local(path, _dumps(self.body()))

    def check(self) -> None:
        """Raise :class:`LockLost` unless this owner still holds the lock."""
        held = self.read()
        if held is None or held.get("owner") != self.owner:
            raise LockLost(f"lock {self.lock_uri} is no longer held by {self.owner} "
                           f"(now {(held or {}).get('owner')}); not committing the state")

    def _refresh_loop(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                self.refresh()
            except LockLost as exc:
                log.error("%s", exc)
                return
            except Exception as exc:  # transient storage error: try again next beat
                log.warning("lock refresh of %s failed: %s", self.lock_uri, exc)

    def release(self) -> None:
        """Stop refreshing and delete the lock if this owner still holds it. Storage errors
        are logged, not raised (release runs while another error may be propagating; an
        undeleted lock expires after ``ttl_s``, or at once for a dead process on this host)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        try:
            if _is_s3(self.uri):
                if self._etag is not None:
                    s3_delete(self.lock_uri, if_match=self._etag)
                self._etag = None
                return
            with self._guard() as path:
                held = self._read_local(path)
                if held is not None and held.get("owner") == self.owner:
                    os.unlink(path)
                    os.unlink(f"{path}.guard")  # others re-open it (see _guard)
        except FileNotFoundError:
            pass
        except Exception as exc:  # noqa: BLE001 - storage unreachable: keep the original error
            log.warning("could not release lock %s (%s); it expires after its ttl (%.0f s) or "
                        "when this process has exited", self.lock_uri, exc, self.ttl_s)

    def __enter__(self) -> Self:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


@dataclass(kw_only=True)
class StateLock(ExpiringLock):
    """The re-screen lock ``STATE/LOCK`` of the state directory ``uri``; raises
    :class:`RescreenBusy` while another re-screen holds it."""

    @property
    def lock_uri(self) -> str:
        """URI of the lock object."""
        return f"{self.uri.rstrip('/')}/{LOCK}"

    def busy_error(self, held: dict[str, Any] | None) -> Exception:
        held = held or {}
        return RescreenBusy(f"another re-screen is running: lock {self.lock_uri} is held by "
                            f"{held.get('owner', '?')} until {held.get('expires_at_iso', '?')} "
                            "(UTC); wait for it to finish, or remove the lock if that run is "
                            "certainly dead")
