"""``cathode-ray rescreen``: re-screen only what changed when the Materials Project updates.

One invocation (cron, Kubernetes CronJob, KubeRay RayJob; see ``docs/rescreen.md``)::

    heartbeat db_version + model_id  --same as the state and not --force-->  "up to date", exit 0
        | changed
    take STATE/LOCK (busy -> RescreenBusy)  ->  query the pinned Li-TM-O set
    -> fingerprint every material, diff against the state's fingerprints
    -> stage new + changed materials as JSON lines   DEST/_staging/db_version=V/RUN.jsonl
    -> screen them (Ray Data pipeline, resume=True)  DEST/results/run_id=RUN/, rejects/, _runs/
    -> rebuild the latest view                       DEST/latest/latest.parquet
    -> commit the state (atomic)                     STATE/...   (the commit point)

``RUN`` = ``mp-<db_version>-<model_id[:12]>-g<generation>`` where ``generation`` is the number of
committed re-screens + 1. It depends only on the committed state, so a re-screen that crashed
before its state write gets the same run id on the next attempt and resumes (or, when its screen
had finished, skips straight to the view and the state). The results of a run therefore live in
``DEST/results/run_id=mp-<db_version>-...``: the db version is part of the run-id partition (the
screen pipeline owns the ``results/run_id=`` layout), and every row of the latest view carries
its ``db_version`` column.

A model change (different ``model_id``) re-screens every current material; otherwise only
materials that are new or whose fingerprint changed. Materials that left the MP set stay in the
latest view with ``withdrawn=True`` (and ``withdrawn_db_version``); they are never deleted.
A material whose newest screen was a reject (e.g. out of scope) has no row in the latest view;
its reject is under ``DEST/rejects/run_id=RUN/``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cathode_ray.screen.state import (
    RescreenBusy,
    StateLock,
    StateStore,
    utc_iso,
    write_atomic_local,
)
from cathode_ray.storage import check_dest, filesystem_for, is_remote, join

log = logging.getLogger(__name__)

__all__ = ["RescreenBusy", "RescreenConfig", "RescreenOutcome", "run"]

#: Energies (eV/atom) that enter a material's fingerprint, when present in its summary doc.
FINGERPRINT_ENERGIES: tuple[str, ...] = (
    "energy_per_atom",
    "uncorrected_energy_per_atom",
    "formation_energy_per_atom",
    "energy_above_hull",
)
LATEST_FILE = "latest.parquet"
UP_TO_DATE, SCREENED = "up_to_date", "screened"


class InjectedCrash(RuntimeError):
    """Raised by the ``_crash_before_state_write`` test hook."""


@dataclass(frozen=True, kw_only=True)
class RescreenConfig:
    """What ``cathode-ray rescreen`` does.

    Attributes:
        source: where materials come from; only ``mp`` (the pinned Li-TM-O query).
        model: calibrated model directory (local or s3://); its ``model_id`` is tracked.
        out: DEST (local path or ``s3://bucket/prefix``), shared with ``cathode-ray screen``.
        state: state directory (None: ``DEST/_state``).
        references: reference hull source for the screen, ``mp`` or ``snapshot:PATH``.
        force: re-screen every current material even when nothing changed.
        address: Ray address (None: ``RAY_ADDRESS`` when set, else a fresh local Ray).
        endpoint: MP API endpoint (None: ``MP_API_ENDPOINT``, else the public API).
        gpu_actors: GPU inference actors of the screen (0 = CPU actors).
        cpu_actors: CPU inference actors when ``gpu_actors == 0``.
        cpus_per_actor: logical CPUs each CPU inference actor reserves (below 1 on tiny
            clusters, so that the library read task still finds a CPU next to the actors).
        lock_ttl_s: seconds without a refresh before the re-screen lock counts as abandoned.
        verbose: print the screen's summary table.
        _crash_before_state_write: test hook; raise :class:`InjectedCrash` after the screen and
            the latest view, before the state commit.
    """

    source: str = "mp"
    model: str
    out: str
    state: str | None = None
    references: str = "mp"
    force: bool = False
    address: str | None = None
    endpoint: str | None = None
    gpu_actors: int = 0
    cpu_actors: int = 1
    cpus_per_actor: float = 1.0
    lock_ttl_s: float = 3600.0
    verbose: bool = False
    _crash_before_state_write: bool = field(default=False, repr=False)

    def __post_init__(self) -> None:
        if self.source != "mp":
            raise ValueError(f"--source {self.source!r} is not supported; re-screens track the "
                             "Materials Project: use --source mp")
        for name in ("model", "out", "references"):
            if not getattr(self, name):
                raise ValueError(f"{name} must be given")
        check_dest(self.out, "out")
        if self.state:
            check_dest(self.state, "state")
        if self.gpu_actors < 0 or self.cpu_actors < 1:
            raise ValueError("need gpu_actors >= 0 and cpu_actors >= 1")
        if not self.cpus_per_actor > 0:
            raise ValueError(f"cpus_per_actor must be > 0, got {self.cpus_per_actor}")
        if not self.lock_ttl_s > 0:
            raise ValueError(f"lock_ttl_s must be > 0 s, got {self.lock_ttl_s}")

    @property
    def state_uri(self) -> str:
        """The state directory: ``state`` or ``DEST/_state``."""
        return self.state or join(self.out, "_state")


@dataclass(frozen=True, kw_only=True)
class RescreenOutcome:
    """What one re-screen did. ``status`` is ``up_to_date`` or ``screened``.

    ``screened`` counts materials sent to the screen (new + changed, or all on a model change /
    --force), ``withdrawn`` the materials newly marked withdrawn by this run.
    """

    status: str
    message: str
    db_version: str
    model_id: str
    run_id: str | None = None
    screened: int = 0
    new: int = 0
    changed: int = 0
    withdrawn: int = 0
    n_results: int = 0
    n_rejects: int = 0
    resumed: bool = False
    latest_uri: str | None = None
    state_uri: str | None = None
    seconds: float = 0.0


# --------------------------------------------------------------------------- fingerprints
def fingerprint(doc: Mapping[str, Any]) -> str:
    """sha256 over material_id, the canonical structure and the energies of one summary doc.

    Canonical as :func:`cathode_ray.data.sources.content_hash`: structure reduced to lattice,
    species and fractional coordinates; floats rounded to 8 decimals; sorted-key JSON.
    """
    from cathode_ray.data.sources import _canonical, _structure_key

    structure = doc.get("structure")
    record = {
        "material_id": str(doc["material_id"]),
        "structure": _structure_key(structure) if structure else None,
        "energies": {k: doc.get(k) for k in FINGERPRINT_ENERGIES},
    }
    line = json.dumps(_canonical(record), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(line.encode()).hexdigest()


@dataclass(frozen=True, kw_only=True)
class ChangePlan:
    """Material ids by what happened since the last committed re-screen (sorted tuples)."""

    new: tuple[str, ...]
    changed: tuple[str, ...]
    unchanged: tuple[str, ...]
    withdrawn: tuple[str, ...]
    full: bool  # model change / --force / first run: screen everything current

    @property
    def to_screen(self) -> tuple[str, ...]:
        """Ids to screen: all current ones when ``full``, else new + changed."""
        if self.full:
            return tuple(sorted((*self.new, *self.changed, *self.unchanged)))
        return tuple(sorted((*self.new, *self.changed)))


def plan_changes(*, previous: Mapping[str, str], current: Mapping[str, str],
                 full: bool) -> ChangePlan:
    """Diff ``{material_id: fingerprint}`` maps; ``full`` screens every current material."""
    new = sorted(k for k in current if k not in previous)
    changed = sorted(k for k in current if k in previous and previous[k] != current[k])
    unchanged = sorted(k for k in current if k in previous and previous[k] == current[k])
    withdrawn = sorted(k for k in previous if k not in current)
    return ChangePlan(new=tuple(new), changed=tuple(changed), unchanged=tuple(unchanged),
                      withdrawn=tuple(withdrawn), full=full)


def run_id_for(db_version: str, model_id: str, generation: int) -> str:
    """``mp-<db_version>-<model_id[:12]>-g<generation>`` (characters outside [A-Za-z0-9._-]
    of the db version become ``_``)."""
    safe = _safe(db_version)[:80] or "unknown"
    return f"mp-{safe}-{model_id[:12]}-g{generation}"


# --------------------------------------------------------------------------- IO helpers
def _write_bytes(uri: str, data: bytes) -> None:
    """Write a file atomically (local temp + os.replace; one S3 PUT)."""
    fs, path = filesystem_for(uri)
    if not is_remote(uri):
        write_atomic_local(path, data)
        return
    with fs.open_output_stream(path) as fh:
        fh.write(data)


def _read_bytes(uri: str) -> bytes | None:
    """The content of the file at ``uri``, or None when there is none."""
    import pyarrow.fs as pafs

    fs, path = filesystem_for(uri)
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as fh:
        return fh.read()


def stage_library(uri: str, docs: Sequence[Mapping[str, Any]]) -> str:
    """Write ``docs`` as a JSON-lines library at ``uri`` (one MP summary doc per line).

    A file there with the same content is left as it is: its listing (size, mtime) is the
    library fingerprint of the run's screen, which a resume must find unchanged.
    """
    body = "".join(json.dumps(dict(d), sort_keys=True, default=str) + "\n" for d in docs).encode()
    if _read_bytes(uri) == body:
        log.debug("%s already holds these %d docs; kept", uri, len(docs))
        return uri
    _write_bytes(uri, body)
    return uri


def staged_fingerprint(uri: str) -> str:
    """The screen pipeline's library fingerprint of the staged file at ``uri``."""
    from cathode_ray.screen.pipeline import library_fingerprint

    return library_fingerprint(uri)


def _delete_tree(uri: str) -> None:
    fs, path = filesystem_for(uri)
    try:
        fs.delete_dir(path)
    except (FileNotFoundError, OSError) as exc:
        log.debug("could not delete %s: %s", uri, exc)


def model_id_of(model: str) -> str:
    """The model's ``model_id`` from its manifest.json (the whole manifest verified against it, format 2)."""
    from cathode_ray.model.artifact import ModelDir

    manifest = ModelDir(uri=model).read_manifest(verify=True)
    return str(manifest["model_id"])


# --------------------------------------------------------------------------- latest view
def latest_schema() -> Any:
    """Schema of ``DEST/latest/latest.parquet``: RESULT_SCHEMA + db_version, withdrawn,
    withdrawn_db_version (MP db version at which the material left the set; null if current)."""
    import pyarrow as pa

    from cathode_ray.screen.schema import RESULT_SCHEMA

    return pa.schema([*RESULT_SCHEMA,
                      pa.field("db_version", pa.string(), nullable=False),
                      pa.field("withdrawn", pa.bool_(), nullable=False),
                      pa.field("withdrawn_db_version", pa.string())])


def merge_latest(previous: Any | None, results: Any, *, rescreened: Iterable[str],
                 current: Iterable[str], db_version: str) -> Any:
    """The new latest view (pyarrow Table of :func:`latest_schema`).

    Rows of ``previous`` for re-screened materials are replaced by ``results`` (tagged with
    ``db_version``); a re-screened material without a result (rejected) loses its row. Every
    row whose material is not in ``current`` is marked withdrawn (keeping an earlier
    ``withdrawn_db_version``). Idempotent: merging the same results twice gives the same view.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    from cathode_ray.screen.schema import conform

    schema = latest_schema()
    redo = pa.array(sorted(set(rescreened)), type=pa.string())
    kept = conform(previous, schema) if previous is not None else schema.empty_table()
    kept = kept.filter(pc.invert(pc.is_in(kept.column("structure_id"), value_set=redo)))
    n = results.num_rows
    fresh = (results.append_column("db_version", pa.array([db_version] * n, type=pa.string()))
             .append_column("withdrawn", pa.array([False] * n, type=pa.bool_())))
    merged = pa.concat_tables([kept, conform(fresh, schema)])
    ids = pa.array(sorted(set(current)), type=pa.string())
    gone = pc.invert(pc.is_in(merged.column("structure_id"), value_set=ids))
    was = merged.column("withdrawn_db_version")
    since = pc.if_else(gone, pc.coalesce(was, pa.scalar(db_version)),
                       pa.scalar(None, type=pa.string()))
    for name, column in (("withdrawn", gone), ("withdrawn_db_version", since)):
        merged = merged.set_column(schema.get_field_index(name), schema.field(name), column)
    order = pc.sort_indices(merged, sort_keys=[("structure_id", "ascending")])
    return conform(merged.take(order), schema)


def read_latest(uri: str) -> Any | None:
    """The latest view at ``uri`` (file), or None when it does not exist yet."""
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    fs, path = filesystem_for(uri)
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    return pq.read_table(path, filesystem=fs, partitioning=None)


def write_latest(uri: str, table: Any) -> None:
    """Replace the latest view atomically (local temp + os.replace; one S3 object)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    _write_bytes(uri, sink.getvalue().to_pybytes())


# --------------------------------------------------------------------------- run
@dataclass(frozen=True, kw_only=True)
class _Versions:
    db_version: str
    model_id: str


def _current_versions(config: RescreenConfig) -> _Versions:
    from cathode_ray.data.sources import mp_database_version

    return _Versions(db_version=mp_database_version(endpoint=config.endpoint),
                     model_id=model_id_of(config.model))


def _is_up_to_date(state: Mapping[str, Any] | None, versions: _Versions, force: bool) -> bool:
    return (not force and state is not None and state.get("db_version") == versions.db_version
            and state.get("model_id") == versions.model_id)


def _up_to_date(config: RescreenConfig, versions: _Versions, t0: float) -> RescreenOutcome:
    return RescreenOutcome(
        status=UP_TO_DATE, db_version=versions.db_version, model_id=versions.model_id,
        state_uri=config.state_uri, seconds=time.perf_counter() - t0,
        message=(f"up to date: MP db_version {versions.db_version} and model "
                 f"{versions.model_id[:12]} were already screened into {config.out}"))


def run(config: RescreenConfig) -> RescreenOutcome:
    """Re-screen what changed in MP (or everything on a model change / ``force``).

    Raises:
        RescreenBusy: another re-screen holds the lock.
        cathode_ray.data.sources.SourceError: MP could not be reached or queried.
        cathode_ray.screen.state.StateError / LockLost: the state could not be committed
            safely; nothing was committed, the next run resumes.
    """
    t0 = time.perf_counter()
    store = StateStore(uri=config.state_uri)
    versions = _current_versions(config)
    seen = store.read()
    if _is_up_to_date(seen, versions, _must_force(config, seen, versions)):
        return _up_to_date(config, versions, t0)
    lock = StateLock(uri=config.state_uri, ttl_s=config.lock_ttl_s)
    with lock:
        state = store.read()  # another run may have committed while we checked
        force = _must_force(config, state, versions)
        if _is_up_to_date(state, versions, force):
            return _up_to_date(config, versions, t0)
        return _rescreen_locked(config, store, lock, state or {}, versions, force, t0)


def _staged_uri(out: str, db_version: str, run_id: str) -> str:
    """Where run ``run_id`` stages its materials; removed when its state commits."""
    return join(out, "_staging", f"db_version={_safe(db_version)}", f"{run_id}.jsonl")


def _must_force(config: RescreenConfig, state: Mapping[str, Any] | None,
                versions: _Versions) -> bool:
    """``config.force``, or True when a forced re-screen of these very versions staged its
    materials and never committed (it crashed): its run is resumed instead of being
    reported "up to date" against the state it left untouched. Only a forced run stages
    for versions the state already has, so the staged file of the next generation's run
    id is its mark."""
    if config.force or state is None:
        return config.force
    if (state.get("db_version"), state.get("model_id")) != (versions.db_version,
                                                             versions.model_id):
        return False
    import pyarrow.fs as pafs

    run_id = run_id_for(versions.db_version, versions.model_id,
                        len(state.get("history", [])) + 1)
    fs, path = filesystem_for(_staged_uri(config.out, versions.db_version, run_id))
    if fs.get_file_info(path).type != pafs.FileType.File:
        return False
    log.warning("re-screen run %s was forced and did not finish; resuming it as forced",
                run_id)
    return True


def _rescreen_locked(config: RescreenConfig, store: StateStore, lock: StateLock,
                     state: Mapping[str, Any], versions: _Versions, force: bool,
                     t0: float) -> RescreenOutcome:
    from cathode_ray.data.sources import fetch_mp_summary

    # Screening needs no labels: the summary's own energies only feed the fingerprints.
    docs = {str(d["material_id"]): d
            for d in fetch_mp_summary(endpoint=config.endpoint, label_thermo_type=None)}
    current = {mid: fingerprint(doc) for mid, doc in docs.items()}
    previous: dict[str, str] = dict(state.get("fingerprints", {}))
    full = force or not state or state.get("model_id") != versions.model_id
    plan = plan_changes(previous=previous, current=current, full=full)
    history = list(state.get("history", []))
    run_id = run_id_for(versions.db_version, versions.model_id, len(history) + 1)
    counts, resumed = _screen(config, run_id, versions.db_version,
                              [docs[m] for m in plan.to_screen])
    lock.check()  # a re-screen whose lock was taken over must not replace the view
    latest_uri = _update_latest(config.out, run_id, plan, current, versions.db_version)
    if config._crash_before_state_write:
        raise InjectedCrash(f"injected crash before the state write of run {run_id}")
    lock.check()
    entry = _history_entry(run_id, versions, plan, counts, force)
    store.write({"db_version": versions.db_version, "model_id": versions.model_id,
                 "run_id": run_id, "fingerprints": dict(sorted(current.items())),
                 "history": [*history, entry], "dest": config.out})
    _delete_tree(join(config.out, "_staging", f"db_version={_safe(versions.db_version)}"))
    return RescreenOutcome(
        status=SCREENED, db_version=versions.db_version, model_id=versions.model_id,
        run_id=run_id, screened=len(plan.to_screen), new=len(plan.new),
        changed=len(plan.changed), withdrawn=len(plan.withdrawn), n_results=counts["results"],
        n_rejects=counts["rejects"], resumed=resumed, latest_uri=latest_uri,
        state_uri=config.state_uri, seconds=time.perf_counter() - t0,
        message=(f"screened {len(plan.to_screen)} materials (new {len(plan.new)}, changed "
                 f"{len(plan.changed)}{', full re-screen' if plan.full else ''}) of MP "
                 f"db_version {versions.db_version} with model {versions.model_id[:12]}: "
                 f"{counts['results']} results, {counts['rejects']} rejects; "
                 f"{len(plan.withdrawn)} withdrawn; run {run_id}; latest view {latest_uri}"))


def _update_latest(out: str, run_id: str, plan: ChangePlan, current: Iterable[str],
                   db_version: str) -> str:
    """Merge run ``run_id``'s results into ``DEST/latest/latest.parquet``; returns its URI."""
    from cathode_ray.screen import runs

    latest_uri = join(out, "latest", LATEST_FILE)
    results = runs.read_results(out, run_id)
    view = merge_latest(read_latest(latest_uri), results, rescreened=plan.to_screen,
                        current=current, db_version=db_version)
    write_latest(latest_uri, view)
    return latest_uri


def _safe(db_version: str) -> str:
    """``db_version`` with characters outside [A-Za-z0-9._-] replaced by ``_``."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", db_version)


def _history_entry(run_id: str, versions: _Versions, plan: ChangePlan,
                   counts: Mapping[str, int], force: bool) -> dict[str, Any]:
    return {"run_id": run_id, "db_version": versions.db_version, "model_id": versions.model_id,
            "finished": utc_iso(), "screened": len(plan.to_screen), "new": len(plan.new),
            "changed": len(plan.changed), "withdrawn": list(plan.withdrawn),
            "full": plan.full, "forced": force, **counts}


def _screen(config: RescreenConfig, run_id: str, db_version: str,
            docs: Sequence[Mapping[str, Any]]) -> tuple[dict[str, int], bool]:
    """Screen ``docs`` as run ``run_id`` (resuming it); ({results, rejects}, resumed)."""
    from cathode_ray.screen import runs
    from cathode_ray.screen.pipeline import LibraryChangedError

    if not docs:
        return {"results": 0, "rejects": 0}, False
    paths = runs.RunPaths(dest=config.out, run_id=run_id)
    manifest = runs.read_json(paths.manifest)
    library = _staged_uri(config.out, db_version, run_id)
    stage_library(library, docs)
    if _screened_already(manifest, library, len(docs)):
        log.info("run %s already screened; skipping to the latest view", run_id)
        return {"results": int(manifest["n_results"]),
                "rejects": int(manifest["n_rejects"])}, True
    earlier = manifest is not None or runs.read_json(paths.start) is not None
    try:
        summary = _run_pipeline(config, library, run_id)
    except LibraryChangedError as exc:
        raise LibraryChangedError(
            f"re-screen run {run_id!r}: the materials to screen differ from those an earlier "
            f"attempt of it staged (MP data changed within db_version {db_version}, or "
            f"{library} was removed); to screen them afresh, delete {paths.results}, "
            f"{paths.rejects}, {paths.manifest} and {paths.start}, then run again") from exc
    return {"results": summary.n_results, "rejects": summary.n_rejects}, earlier


def _screened_already(manifest: Mapping[str, Any] | None, library: str, n_docs: int) -> bool:
    """True when the run's manifest says complete for exactly the staged library: the same
    number of inputs and the library fingerprint of the staged file as it is now."""
    return (manifest is not None and manifest.get("status") == "complete"
            and manifest.get("n_inputs") == n_docs
            and manifest.get("library_fingerprint") == staged_fingerprint(library))


def _run_pipeline(config: RescreenConfig, library: str, run_id: str) -> Any:
    from cathode_ray.screen.pipeline import ScreenConfig
    from cathode_ray.screen.pipeline import run as screen

    return screen(ScreenConfig(
        library=library, model=config.model, out=config.out, references=config.references,
        address=config.address, run_id=run_id, resume=True, gpu_actors=config.gpu_actors,
        cpu_actors=config.cpu_actors, cpus_per_actor=config.cpus_per_actor,
        verbose=config.verbose))

