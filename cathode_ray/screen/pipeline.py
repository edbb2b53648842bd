"""``cathode-ray screen``: stream a structure library through the calibrated ensemble on Ray Data.

    read (<= 1,024-row ranges of large Parquet files, else one task per file; 256-row blocks)
    -> validate (+ duplicate marks, resume skips) -> graphs (CPU actors)
    -> ensemble + calibration/OOD/triage (actor pool; GPU or CPU) -> results + rejects Parquet

Memory is bounded, not proportional to the library: reads are small tasks, blocks are at most
4 MiB, and the blocks queued between stages share an object-store budget (``object_store_mb``).

De-duplication is a separate *index pass* over ids only: every file is read once more for its
structure ids (no parsing), a Ray Data ``groupby(structure_id).count()`` finds the repeated ids,
and only the rows of those ids are brought to the driver to rank their occurrences by input
order. The (small) ``{order: occurrence}`` map is shipped to the validate tasks, so later
duplicates become ``duplicate_id`` rejects without ever holding all ids in one process. The same
pass counts the inputs for the ``results + rejects == inputs`` invariant, and the rows of each
file, from which the read tasks are planned.

See :mod:`.runs` for the DEST layout, locks and the run manifest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from cathode_ray import seedcard
from cathode_ray.data.validate import ValidationConfig
from cathode_ray.screen import runs, stages
from cathode_ray.storage import check_dest

if TYPE_CHECKING:
    from cathode_ray.data.library import LibraryFile

log = logging.getLogger(__name__)

_BATCH_ROWS = 32  # rows per validate / graph call (inference: ScreenConfig.batch_rows)
#: Rows the driver takes from the pipeline at a time. The writer gathers them as Arrow tables up to
#: ``min_rows_per_file``; a 20,000-row pandas batch held ~30 MB of the driver's heap while it
#: filled, and its high-water mark grew the driver by ~0.15 GB over a 100k screen.
_DRIVER_BATCH_ROWS = 2048
#: Largest block a stage emits. Ray Data's 128 MiB default lets one graph-stage task build ~1,000
#: graphs before handing them on (16 MiB kept the actors' memory a third lower). 4 MiB blocks fit
#: Ray Data's per-stage share of a 128 MB budget, so reads can no longer run far ahead of graph
#: building and the object store's pages stop growing with the library (docs/performance.md).
_MAX_BLOCK_BYTES = 4 << 20
#: Logical CPUs of the light task stages (read, validate). Ray Data starts the actor pools
#: eagerly; tasks that ask for a whole CPU next to them can starve forever on small machines.
_LIGHT_CPUS = 0.25
#: Read tasks: one library file per task wasted ~25 ms of task overhead on each small file (a
#: folder of 1,326 CIFs: 33 s of index pass); small files are therefore read up to 64 or 16 MB a
#: task, while at most 1,000 tasks keep a large library spread over the cluster.
_FILES_PER_READ_TASK = 64
_BYTES_PER_READ_TASK = 16 << 20
_MAX_READ_TASKS = 1000


class ScreenInvariantError(RuntimeError):
    """Output does not account for every input exactly once."""


class LibraryChangedError(ValueError):
    """A resume was given another library than the one its run started with."""


@dataclass(frozen=True, kw_only=True)
class ScreenConfig:
    """What ``cathode-ray screen`` does.

    Attributes:
        library: library spec (file, directory, glob, ``s3://`` prefix), ``mp`` (live Materials
            Project query) or ``demo`` (``demo_library(demo_size)``).
        model: calibrated model directory (local or s3://), hash-verified on load.
        out: DEST (local path or ``s3://bucket/prefix``).
        references: reference entries for hulls, ``snapshot:PATH`` or ``mp``.
        address: Ray address (None: ``RAY_ADDRESS`` when set, else a fresh local Ray).
        run_id: run id (None: a new timestamped one); resume needs the same id.
        resume: continue a run: skip inputs already written for ``run_id``; the library must
            have the fingerprint the run started with (:class:`LibraryChangedError`).
        gpu_actors: inference actors with one GPU each (0 = CPU actors).
        cpu_actors: CPU inference actors when ``gpu_actors == 0``.
        cpus_per_actor: logical CPUs each CPU inference actor reserves.
        inference_threads: torch threads of each inference actor. None: on a local Ray that this
            process started (the embedded default), the cores it may use, capped at that Ray's
            CPUs and divided among the CPU inference actors, since reading and graph building
            need little CPU next to them (two threads run the bundled CHGNet ensemble 1.65x
            faster than one on 2 cores); on a cluster, and for GPU actors, the CPUs the actor
            reserves (Ray's OMP_NUM_THREADS).
        graph_actors: most graph-building CPU actors (an autoscaling pool from one actor up);
            None: 1 with CPU inference actors, ``seedcard.GRAPH_ACTORS_PER_GPU`` (8) per GPU
            actor, so that the CPUs keep the GPUs fed (see :attr:`graph_pool`).
        light_tasks: most concurrent read and validate tasks. Each runs in its own worker process
            (pymatgen loaded, ~0.25-0.4 GB), so this bounds the screen's memory: unbounded, Ray
            starts as many as fit in the free CPU fractions and peak memory grows with the run.
            One validate task handles ~300 structures/s, faster than one graph actor (CHGNet
            ~110/s, MACE ~170/s with hull inputs). None: 1 with CPU inference actors,
            ``seedcard.LIGHT_TASKS_PER_GPU`` (2) per GPU actor.
        max_edges_per_batch: edge budget of one inference sub-batch (directed graph edges);
            None: ``seedcard.MAX_EDGES_PER_BATCH_CPU`` (12,500) or ``_GPU`` (400,000) by actor kind.
        inference_batch_rows: rows handed to an inference actor per call (split inside by the
            edge budget); None: ``seedcard.INFERENCE_BATCH_ROWS_CPU`` (32) or ``_GPU`` (256).
        inference_calls_per_actor: calls an inference actor takes at once: input batching and
            output serialisation overlap the model, which still runs one call at a time; None:
            ``seedcard.INFERENCE_CALLS_PER_ACTOR_CPU`` (1) or ``_GPU`` (2).
        object_store_mb: object-store memory (MB) that blocks queued between the stages may use
            (Ray Data backpressure). It bounds the screen's memory whatever the library size;
            ``None`` leaves Ray Data's default, a share of the node's object store. Ray Data
            reserves a share per stage (budget / 8 for each stage's outputs), which must hold a
            few 4 MiB blocks: below ~64 MB the screen crawls. Raise it on GPU nodes, where more
            graph blocks are in flight per second (docs/performance.md).
        precision: inference precision of the last block(s): ``float32``, ``tf32`` (CUDA
            matmuls) or ``bf16`` (autocast). A reduced precision is checked against float32 on
            each actor's first sub-batch; above ``seedcard.PRECISION_MAX_DEVIATION`` (1 meV/atom)
            the actor falls back to float32 and logs why.
        stack_members: run last-block members as one vectorised call (``torch.func``) rather
            than one after another (same results; falls back by itself where unsupported).
            Off by default: on CPU it measured slower than the loop (docs/performance.md).
        compile_model: run the frozen trunk and the members' last blocks through
            ``torch.compile``d functions (TorchInductor; the last blocks in float32 only; same
            results to float rounding). Each actor compiles on its first batch, and a part that
            fails to compile runs uncompiled, logged. An alternative to ``stack_members``.
        gpu_wait_s: with GPU actors, seconds to wait for the cluster to have that many GPUs
            (asking the autoscaler for them) before failing with :class:`NoGPUError`; a local
            Ray started by this process (by the screen, or ``ray.init()`` in a notebook) fails at
            once: it cannot gain GPUs.
        demo_size: structures of the ``demo`` library.
        min_rows_per_file: rows gathered (as Arrow tables, in the driver) before one results
            file and one rejects file are written; a run's last files hold the rest.
        lock_ttl_s: seconds without heartbeat before a run lock counts as abandoned.
        validation: structure checks.
        verbose: print the summary table at the end.
    """

    library: str
    model: str
    out: str
    references: str
    address: str | None = None
    run_id: str | None = None
    resume: bool = False
    gpu_actors: int = 0
    cpu_actors: int = 1
    cpus_per_actor: float = 1.0
    inference_threads: int | None = None
    graph_actors: int | None = None
    light_tasks: int | None = None
    max_edges_per_batch: int | None = None
    inference_batch_rows: int | None = None
    inference_calls_per_actor: int | None = None
    object_store_mb: float | None = 128.0
    precision: str = "float32"
    stack_members: bool = False
    compile_model: bool = False
    gpu_wait_s: float = seedcard.GPU_WAIT_S
    demo_size: int = 2000
    min_rows_per_file: int = stages.ROWS_PER_FILE
    lock_ttl_s: float = 600.0
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    verbose: bool = True

    def __post_init__(self) -> None:
        import dataclasses
        import numbers

        # Types first, so that a wrong one ("2", 2.5, True for an int; a dict for validation) is a
        # ValueError naming the field, not a TypeError below or an AttributeError in a Ray worker.
        # Fields whose annotation is not a union of these kinds are left to their own checks.
        kinds: dict[str, tuple[type, ...]] = {
            "str": (str,), "bool": (bool,), "int": (numbers.Integral,), "float": (numbers.Real,),
            "None": (type(None),), "ValidationConfig": (ValidationConfig,)}
        for f in dataclasses.fields(self):
            parts = str(f.type).replace(" ", "").split("|")
            if not all(p in kinds for p in parts):
                continue
            value = getattr(self, f.name)
            ok = any(isinstance(value, kinds[p]) for p in parts)
            if isinstance(value, bool) and "bool" not in parts:  # bool is an int, but not here
                ok = False
            if not ok:
                raise ValueError(f"{f.name} must be {' or '.join(parts)}, got "
                                 f"{type(value).__name__} {value!r}")
        for name in ("library", "model", "out", "references"):
            if not getattr(self, name):
                raise ValueError(f"{name} must be given")
        check_dest(self.out, "out")
        if self.gpu_actors < 0 or self.cpu_actors < 1:
            raise ValueError("need gpu_actors >= 0 and cpu_actors >= 1")
        if not self.cpus_per_actor > 0:
            raise ValueError(f"cpus_per_actor must be > 0, got {self.cpus_per_actor}")
        from cathode_ray.model.stacked import check_precision

        check_precision(self.precision)
        if self.stack_members and self.compile_model:
            raise ValueError("stack_members and compile_model are alternatives: choose one")
        for name in ("inference_threads", "graph_actors", "light_tasks", "max_edges_per_batch", "inference_batch_rows",
                     "inference_calls_per_actor"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.object_store_mb is not None and not self.object_store_mb > 0:
            raise ValueError(f"object_store_mb must be > 0 or None, got {self.object_store_mb}")
        if not self.gpu_wait_s >= 0:
            raise ValueError(f"gpu_wait_s must be >= 0, got {self.gpu_wait_s}")
        if self.demo_size < 0 or self.min_rows_per_file < 1 or self.lock_ttl_s <= 0:
            raise ValueError("need demo_size >= 0, min_rows_per_file >= 1, lock_ttl_s > 0")
        if self.resume and not self.run_id:
            raise ValueError("--resume needs the --run-id of the run to continue")
        if self.run_id is not None:
            runs.check_run_id(self.run_id)

    def _by_actor_kind(self, explicit: int | None, cpu: int, gpu: int) -> int:
        """``explicit`` when given, else the seed-card default for the inference actors' kind."""
        if explicit is not None:
            return explicit
        return gpu if self.gpu_actors else cpu

    def threads_per_actor(self, local_cores: int | None) -> int | None:
        """Torch threads per inference actor (None: leave the actor's own setting).

        Args:
            local_cores: cores of the machine when the screen runs on a local Ray it started,
                else None.
        """
        if self.inference_threads is not None:
            return self.inference_threads
        if self.gpu_actors or local_cores is None:
            return None
        return max(1, local_cores // self.cpu_actors)

    @property
    def graph_pool(self) -> int:
        """Most graph-building actors: ``graph_actors``, else 1 on CPU inference actors and
        ``seedcard.GRAPH_ACTORS_PER_GPU`` per GPU actor."""
        return self._by_actor_kind(self.graph_actors, 1, seedcard.GRAPH_ACTORS_PER_GPU * self.gpu_actors)

    @property
    def light_pool(self) -> int:
        """Most concurrent read/validate tasks: ``light_tasks``, else 1 on CPU inference actors
        and ``seedcard.LIGHT_TASKS_PER_GPU`` per GPU actor."""
        return self._by_actor_kind(self.light_tasks, 1, seedcard.LIGHT_TASKS_PER_GPU * self.gpu_actors)

    @property
    def edge_budget(self) -> int:
        """Directed-edge budget of one inference sub-batch."""
        return self._by_actor_kind(self.max_edges_per_batch, seedcard.MAX_EDGES_PER_BATCH_CPU,
                                   seedcard.MAX_EDGES_PER_BATCH_GPU)

    @property
    def batch_rows(self) -> int:
        """Rows per inference call."""
        return self._by_actor_kind(self.inference_batch_rows, seedcard.INFERENCE_BATCH_ROWS_CPU,
                                   seedcard.INFERENCE_BATCH_ROWS_GPU)

    @property
    def calls_per_actor(self) -> int:
        """Concurrent calls per inference actor."""
        return self._by_actor_kind(self.inference_calls_per_actor, seedcard.INFERENCE_CALLS_PER_ACTOR_CPU,
                                   seedcard.INFERENCE_CALLS_PER_ACTOR_GPU)


@dataclass(frozen=True, kw_only=True)
class ScreenSummary:
    """Outcome of :func:`run`: counts for the whole run (all attempts) and this attempt's speed."""

    run_id: str
    out: str
    manifest_uri: str
    n_inputs: int
    n_results: int
    n_rejects: int
    n_skipped: int
    decisions: dict[str, int]
    reject_reasons: dict[str, int]
    seconds: float
    structures_per_s: float
    stage_seconds: dict[str, float]

    def table(self) -> str:
        """Short human-readable summary table."""
        lines = [f"run {self.run_id}: {self.n_inputs} inputs -> {self.n_results} results + "
                 f"{self.n_rejects} rejects ({self.n_skipped} already done) -> {self.out}"]
        lines += [f"  {d:<24s}{n:>8d}" for d, n in self.decisions.items()]
        lines += [f"  reject {r:<17s}{n:>8d}" for r, n in self.reject_reasons.items()]
        lines.append(f"  {'wall time':<24s}{self.seconds:>8.1f} s   "
                     f"{self.structures_per_s:.2f} structures/s")
        lines += [f"  busy {s:<19s}{t:>8.1f} s" for s, t in self.stage_seconds.items()]
        lines.append(f"read it: from cathode_ray.screen.runs import read_results; "
                     f"read_results({self.out!r}, {self.run_id!r}).to_pandas()")
        return "\n".join(lines)


# --------------------------------------------------------------------------- sources
@dataclass(frozen=True, kw_only=True)
class Source:
    """A planned input: library files, or in-memory raw rows (demo / mp)."""

    files: list[str] | None
    rows: list[dict[str, Any]] | None
    fingerprint: str
    labels: list[str] | None = None  # files' names in fallback ids (data.library.file_labels)
    n_bytes: int = 0  # size of the library files


def plan_source(config: ScreenConfig) -> Source:
    """List the library (or build the demo / query MP) and fingerprint it."""
    if config.library == "demo":
        from cathode_ray.data.demo import demo_library

        rows = stages.demo_raw_rows(demo_library(config.demo_size))
        return Source(files=None, rows=rows, fingerprint=_ids_fingerprint(rows))
    if config.library == "mp":
        from cathode_ray.data.sources import fetch_mp_summary

        rows = stages.mp_raw_rows(fetch_mp_summary())
        return Source(files=None, rows=rows, fingerprint=_ids_fingerprint(rows))
    from cathode_ray.data.library import file_labels, list_library

    listed = list_library(config.library)
    files = [f.uri for f in listed]
    labels = file_labels(config.library, files)
    return Source(files=files, rows=None, fingerprint=files_fingerprint(listed, labels),
                  labels=labels, n_bytes=sum(f.size for f in listed))


def library_fingerprint(spec: str) -> str:
    """:func:`files_fingerprint` of the library ``spec`` as it is listed now (of no file when
    nothing is there any more)."""
    from cathode_ray.data.library import file_labels, list_library

    try:
        listed = list_library(spec)
    except FileNotFoundError:
        listed = []
    return files_fingerprint(listed, file_labels(spec, [f.uri for f in listed]))


def files_fingerprint(files: Sequence[LibraryFile], labels: Sequence[str]) -> str:
    """sha256 over (path, size, mtime) of every library file, as listed, and its label: the name
    its rows take in fallback ids, which depends on the library spec (``lib`` names ``a.cif``
    ``cifs/a.cif``, ``lib/cifs`` names it ``a.cif``), so a resume under another spec is refused
    instead of screening every file again under new ids."""
    h = hashlib.sha256()
    for f, label in zip(files, labels, strict=True):
        h.update(f"{f.uri}\t{f.size}\t{f.mtime}\t{label}\n".encode())
    return h.hexdigest()


def read_tasks(n_items: int, n_bytes: int) -> int:
    """How many read tasks (blocks) for ``n_items`` library read items of ``n_bytes`` in all:
    one per item for a few large files, up to ``_FILES_PER_READ_TASK`` small files or
    ``_BYTES_PER_READ_TASK`` a task, never more than ``_MAX_READ_TASKS``."""
    wanted = max(math.ceil(n_items / _FILES_PER_READ_TASK), math.ceil(n_bytes / _BYTES_PER_READ_TASK))
    return max(1, min(n_items, _MAX_READ_TASKS, wanted))


def _ids_fingerprint(rows: list[dict[str, Any]]) -> str:
    h = hashlib.sha256()
    for r in rows:
        h.update(r["structure_id"].encode())
        h.update(hashlib.sha256(r["payload"].encode()).digest())
    return h.hexdigest()


# --------------------------------------------------------------------------- ray plumbing
_FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION",
                  stages.FAULT_EXIT_AFTER_BATCHES_ENV, stages.FAULT_MARKER_ENV)


def _worker_runtime_env() -> dict[str, Any] | None:
    """Driver's S3 endpoint/region for the workers (credentials stay with the cluster's own
    environment / instance role and are never forwarded)."""
    env = {k: os.environ[k] for k in _FORWARDED_ENV if k in os.environ}
    return {"env_vars": env} if env else None


def _ensure_ray(address: str | None) -> str:
    """Connect to (or start) Ray unless already connected. Returns what this call did:
    ``"connected"`` (Ray was initialised already), ``"local"`` (started a fresh local Ray) or
    ``"cluster"`` (connected to ``address`` / ``RAY_ADDRESS``)."""
    import ray

    if ray.is_initialized():
        if address not in (None, "auto"):
            log.warning("Ray is already initialised in this process (GCS %s): the screen runs there and "
                        "ignores address=%r; call ray.shutdown() first to use that cluster",
                        ray.get_runtime_context().gcs_address, address)
        return "connected"
    runtime_env = _worker_runtime_env()
    if address is None and not os.environ.get("RAY_ADDRESS"):
        ray.init(address="local", include_dashboard=False, runtime_env=runtime_env)
        return "local"
    ray.init(address=address, runtime_env=runtime_env)
    return "cluster"


def _ray_started_here() -> bool:
    """True when this process started the Ray it is connected to: the screen's own local Ray, or
    ``ray.init()`` in a notebook. Such a Ray has no autoscaler, so it never gains GPUs."""
    from ray._private import worker  # Ray has no public API for "who started this node"

    return bool(getattr(getattr(worker, "_global_node", None), "head", False))


def _local_cores() -> int | None:
    """When this process started the Ray it runs on (every actor of that Ray is on this machine):
    the cores it may use, or fewer if that Ray was given fewer CPUs (``ray.init(num_cpus=...)``);
    else None."""
    if not _ray_started_here():
        return None
    import ray

    return max(1, min(len(os.sched_getaffinity(0)), int(ray.cluster_resources().get("CPU", 1))))


class NoGPUError(RuntimeError):
    """A screen asked for GPU actors that the Ray cluster does not have (and did not gain)."""


def wait_for_gpus(n: int, timeout_s: float) -> None:
    """Return once the Ray cluster has ``n`` GPUs; raise :class:`NoGPUError` after ``timeout_s``.

    While waiting, the autoscaler is asked for ``n`` one-GPU bundles (``request_resources``): a GPU
    pool that scales from zero starts nodes only on demand. The request is dropped on return.
    Without this check, Ray Data waits forever for GPU actors that no node can host.
    """
    import ray
    from ray.autoscaler.sdk import request_resources

    def gpus() -> int:
        return int(ray.cluster_resources().get("GPU", 0))

    if gpus() >= n:
        return
    deadline = time.monotonic() + timeout_s
    if timeout_s > 0:
        log.info("waiting up to %.0f s for %d GPU(s) (the cluster has %d)", timeout_s, n, gpus())
        request_resources(bundles=[{"GPU": 1}] * n)
        try:
            while gpus() < n and time.monotonic() < deadline:
                time.sleep(min(5.0, max(0.05, deadline - time.monotonic())))
        finally:
            request_resources(bundles=[])
    if gpus() < n:
        raise NoGPUError(
            f"the screen asks for {n} GPU inference actor(s) but the Ray cluster has {gpus()} GPU(s)"
            + (f" after {timeout_s:.0f} s" if timeout_s > 0 else "")
            + ". Run without --gpu-actors (CPU inference), or on a cluster with a GPU pool "
            "(cluster.yaml; check `ray status` and the autoscaler's log). A local Ray sees only this "
            "machine's GPUs.")


def check_cpu_actors_fit(cpus_per_actor: float, *, local: bool) -> None:
    """Raise ValueError when no node of a local Ray has ``cpus_per_actor`` CPUs: Ray Data would
    wait forever for an inference actor no node can host ("pending: 3 CPU" on a 2-CPU Ray,
    measured). On a cluster an autoscaler may still add a larger node, so only a warning."""
    import ray

    largest = max((n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")), default=0.0)
    if cpus_per_actor <= largest:
        return
    text = (f"each CPU inference actor reserves cpus_per_actor={cpus_per_actor:g} CPUs but the largest "
            f"node of this Ray has {largest:g}")
    if local:
        raise ValueError(f"{text}; no actor could start and the screen would wait forever. Set "
                         f"cpus_per_actor to at most {largest:g} (more actors: cpu_actors)")
    log.warning("%s; the screen waits until the autoscaler adds a node that large", text)


@dataclass(frozen=True, kw_only=True)
class InputIndex:
    """What the index pass learns: input count, later duplicates, rows per library file."""

    n_inputs: int
    ranks: dict[int, int]  # {order: occurrence} of later duplicates
    rows_per_file: dict[int, int]  # {file index: raw rows}; empty for in-memory sources


def _input_dataset(source: Source, rows_per_file: dict[int, int] | None = None) -> Any:
    """Raw rows (in-memory sources) or read tasks: one per file for the index pass, row ranges
    of large Parquet files once ``rows_per_file`` is known (:func:`stages.read_items`)."""
    import ray

    if source.rows is not None:
        blocks = max(1, min(len(source.rows) // _BATCH_ROWS, 200))
        return ray.data.from_items(source.rows, override_num_blocks=blocks)
    files = source.files or []
    labels = source.labels or [""] * len(files)
    items = (stages.read_items(files, rows_per_file, labels=labels) if rows_per_file is not None
             else [{"path": p, "file_index": i, "label": label}
                   for i, (p, label) in enumerate(zip(files, labels, strict=True))])
    return ray.data.from_items(items, override_num_blocks=read_tasks(len(items), source.n_bytes))


def index_inputs(source: Source) -> InputIndex:
    """Count the inputs and rank later duplicates (see the module docstring)."""
    from ray.data.expressions import col

    if source.rows is not None:
        sids = [r["structure_id"] for r in source.rows]
        counts: dict[str, int] = {}
        for s in sids:
            counts[s] = counts.get(s, 0) + 1
        dup = [(r["structure_id"], r["order"]) for r in source.rows if counts[r["structure_id"]] > 1]
        return InputIndex(n_inputs=len(sids), rows_per_file={},
                          ranks=stages.duplicate_ranks([d[0] for d in dup], [d[1] for d in dup]))
    env = {"runtime_env": rt} if (rt := _worker_runtime_env()) else {}
    ids = _input_dataset(source).flat_map(stages.read_file_ids, **env).materialize()
    n_inputs = ids.count()
    if n_inputs == 0:
        return InputIndex(n_inputs=0, ranks={}, rows_per_file={})
    rows_per_file: dict[int, int] = {}
    for r in ids.map_batches(stages.count_rows_per_file, batch_format="pandas").take_all():
        rows_per_file[int(r["file_index"])] = rows_per_file.get(int(r["file_index"]), 0) + int(r["rows"])
    repeated = {r["structure_id"] for r in ids.groupby("structure_id").count()
                .filter(expr=col("count()") > 1).take_all()}
    if not repeated:
        return InputIndex(n_inputs=n_inputs, ranks={}, rows_per_file=rows_per_file)
    rows = ids.filter(expr=col("structure_id").is_in(sorted(repeated))).take_all()
    return InputIndex(n_inputs=n_inputs, rows_per_file=rows_per_file,
                      ranks=stages.duplicate_ranks([r["structure_id"] for r in rows],
                                                   [r["order"] for r in rows]))


def build_dataset(config: ScreenConfig, source: Source, *, run_id: str, index: InputIndex,
                  done: frozenset[tuple[str, int]], threads: int | None = None) -> Any:
    """The lazy Ray Data pipeline from raw inputs to final rows (see the module docstring);
    ``threads``: torch threads per inference actor (None: Ray's setting), see
    :meth:`ScreenConfig.threads_per_actor`."""
    import ray

    env = {"runtime_env": rt} if (rt := _worker_runtime_env()) else {}
    ds = _input_dataset(source, index.rows_per_file)
    ranks = index.ranks
    if source.files is not None:
        ds = ds.map_batches(stages.read_file_chunks, batch_format="pandas", batch_size=1,
                            num_cpus=_LIGHT_CPUS,
                            compute=ray.data.TaskPoolStrategy(size=config.light_pool), **env)
    ds = ds.map_batches(stages.ValidateStage(config=config.validation, ranks=ranks, done=done),
                        batch_format="pandas", batch_size=_BATCH_ROWS, num_cpus=_LIGHT_CPUS,
                        compute=ray.data.TaskPoolStrategy(size=config.light_pool), **env)
    ds = ds.map_batches(
        stages.GraphStage, batch_format="pandas", batch_size=_BATCH_ROWS,
        fn_constructor_kwargs={"model": config.model, "references": config.references},
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=config.graph_pool),
        num_cpus=0.5, **env,
    )
    gpu = config.gpu_actors > 0
    ds = ds.map_batches(
        stages.InferenceStage, batch_format="pandas", batch_size=config.batch_rows,
        fn_constructor_kwargs={"model": config.model, "device": "cuda" if gpu else "cpu",
                               "max_edges": config.edge_budget, "run_id": run_id,
                               "precision": config.precision, "stack_members": config.stack_members,
                               "compile_model": config.compile_model,
                               "threads": threads},
        compute=ray.data.ActorPoolStrategy(size=config.gpu_actors if gpu else config.cpu_actors,
                                           max_concurrent_calls_per_actor=config.calls_per_actor),
        **({"num_gpus": 1} if gpu else {"num_cpus": config.cpus_per_actor}), **env,
    )
    # the dataset's own context (a copy): other datasets of this process keep their settings
    ds.context.target_max_block_size = _MAX_BLOCK_BYTES
    # the structure and graph columns are Python objects by design (pickled between stages, never
    # written); saying so stops Ray Data's "Failed to convert column ... into pyarrow array" warning
    ds.context.enable_fallback_to_arrow_object_ext_type = True
    if config.object_store_mb is not None:
        limits = ds.context.execution_options.resource_limits
        ds.context.execution_options.resource_limits = limits.copy(
            object_store_memory=config.object_store_mb * 1e6)
    return ds


# --------------------------------------------------------------------------- run
def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("ray", "torch", "chgnet", "pymatgen", "pyarrow", "cathode_ray"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _model_info(model: str) -> dict[str, Any]:
    from cathode_ray.model.artifact import ModelDir

    # verified here on the driver, so a tampered model fails the run before any actor starts
    manifest = ModelDir(uri=model).read_manifest(verify=True)
    blob = json.dumps(manifest, sort_keys=True).encode()
    return {"model_id": manifest.get("model_id"), "uri": model,
            "manifest_sha256": hashlib.sha256(blob).hexdigest(),
            "data_version": manifest.get("data_version")}


def _refuse_reuse(paths: runs.RunPaths, resume: bool) -> None:
    if resume:
        return
    written = runs.read_json(paths.manifest) is not None or any(
        runs.read_columns(uri, ["structure_id"])["structure_id"]
        for uri in (paths.results, paths.rejects))
    if written:
        raise FileExistsError(f"run {paths.run_id!r} already has output under {paths.dest}; "
                              "pass --resume to continue it, or use another --run-id")


def _recorded(paths: runs.RunPaths, key: str) -> Any:
    """``key`` of the run's start record, else of its manifest (runs started before the start
    record existed), else None."""
    for uri in (paths.start, paths.manifest):
        if (value := (runs.read_json(uri) or {}).get(key)) is not None:
            return value
    return None


def _refuse_other_library(paths: runs.RunPaths, config: ScreenConfig, source: Source) -> None:
    """A resume must screen the library the run started with, as fingerprinted then.

    The fingerprint is recorded in the start record before the run's first row is written (see
    :func:`_write_start_record`), so a run that crashed at any point can be checked; runs
    started before that record existed are checked against their manifest. A run with neither
    resumes on whatever library it is given.
    """
    before = _recorded(paths, "library_fingerprint")
    if before is None or before == source.fingerprint:
        return
    raise LibraryChangedError(
        f"run {paths.run_id!r} was started on another library: {config.library!r} now has "
        f"fingerprint {source.fingerprint[:12]}, the run's is {before[:12]} (files edited, "
        "touched, moved, added or removed since); resume it with the original library, or "
        "screen this one under a new --run-id")


def _refuse_other_references(paths: runs.RunPaths, config: ScreenConfig) -> None:
    """A resume must use the reference hulls the run started with: one run's E_hull values
    share one hull."""
    before = _recorded(paths, "references")
    if before is not None and before != config.references:
        raise ValueError(f"run {paths.run_id!r} was started with references {before!r}, not "
                         f"{config.references!r}; resume it with those, or start a new --run-id")


def _refuse_other_model(paths: runs.RunPaths, model: dict[str, Any]) -> None:
    """A resume must use the model the run started with: one run's rows share one model."""
    before = (_recorded(paths, "model") or {}).get("manifest_sha256")
    written = set(runs.read_columns(paths.results, ["model_id"])["model_id"])
    if (before not in (None, model["manifest_sha256"])
            or written - {model["model_id"]}):
        raise ValueError(f"run {paths.run_id!r} was screened with another model "
                         f"({', '.join(sorted(map(str, written))) or before}); resume it with "
                         "that model, or start a new --run-id for this one")


def run(config: ScreenConfig) -> ScreenSummary:
    """Screen ``config.library`` into ``config.out``; returns counts and timings.

    Raises:
        runs.RunLockedError: the same run id is running elsewhere.
        NoGPUError: GPU actors asked for, and the cluster has (and gained) fewer GPUs.
        FileExistsError: the run id has output already and ``resume`` is off.
        ValueError: ``resume`` with another model than the run's output was screened with.
        LibraryChangedError: ``resume`` with a library whose fingerprint differs from the one
            the run started with (nothing is written).
        ScreenInvariantError: results + rejects != inputs, or duplicated inputs in the output.
        state.LockLost: the run's lock expired and another process took it over; nothing more
            is written (resume the run once that process has finished).
    """
    run_id = config.run_id or runs.new_run_id()
    paths = runs.RunPaths(dest=config.out, run_id=run_id)
    with runs.RunLock(uri=paths.lock, run_id=run_id, ttl_s=config.lock_ttl_s) as lock:
        _refuse_reuse(paths, config.resume)
        # model, references and library are checked before Ray starts: a wrong path fails in a
        # second, not after the actors have started
        from cathode_ray.data.references import check_reference_source

        started, t_plan = runs.utc_now(), time.perf_counter()
        model = _model_info(config.model)
        check_reference_source(config.references)
        source = plan_source(config)
        if config.resume:
            _refuse_other_library(paths, config, source)
            _refuse_other_references(paths, config)
        plan_s = time.perf_counter() - t_plan
        ray_mode = _ensure_ray(config.address)
        try:
            if config.gpu_actors:
                wait_for_gpus(config.gpu_actors,
                              0.0 if _ray_started_here() else config.gpu_wait_s)
            else:
                check_cpu_actors_fit(config.cpus_per_actor, local=_ray_started_here())
            return _run_locked(config, paths, lock, model=model, source=source,
                               started=started, plan_s=plan_s)
        finally:
            if ray_mode != "connected":
                import ray

                ray.shutdown()


def _run_locked(config: ScreenConfig, paths: runs.RunPaths, lock: runs.RunLock, *,
                model: dict[str, Any], source: Source, started: str,
                plan_s: float) -> ScreenSummary:
    """The screen once Ray is up; its time excludes Ray's start-up but counts ``plan_s``."""
    t_plan = time.perf_counter()
    t0 = t_plan - plan_s
    index = index_inputs(source)
    n_inputs = index.n_inputs
    t_index = time.perf_counter()
    done = frozenset(runs.done_keys(paths)) if config.resume else frozenset()
    if config.resume:
        _refuse_other_model(paths, model)
    lock.check()
    _write_start_record(paths, config, model, source, started)
    threads = config.threads_per_actor(_local_cores())
    ds = build_dataset(config, source, run_id=paths.run_id, index=index, done=done, threads=threads)
    writer = stages.ScreenWriter(results_uri=paths.results, rejects_uri=paths.rejects,
                                 run_id=paths.run_id, rows_per_file=config.min_rows_per_file,
                                 check=lock.check)
    driver_rows = min(_DRIVER_BATCH_ROWS, config.min_rows_per_file)
    for batch in ds.iter_batches(batch_size=driver_rows, batch_format="pandas"):
        writer.write(batch)
    writer.flush()
    t_write = time.perf_counter()
    out = runs.output_stats(paths)
    seconds = t_write - t0
    processed = int(writer.stats.get("rows", 0))
    stage_seconds = {"list_library": t_plan - t0, "index_ids": t_index - t_plan,
                     "pipeline_wall": t_write - t_index}
    stage_seconds |= {s.removeprefix("t_"): float(writer.stats.get(s, 0.0))
                      for s in stages.STAGE_TIMES}
    ok = (out["n_results"] + out["n_rejects"] == n_inputs and not out["duplicate_inputs"]
          and not out["duplicate_result_ids"])
    attempt = {
        "started": started, "finished": runs.utc_now(), "resume": config.resume,
        "library_fingerprint": source.fingerprint, "n_inputs": n_inputs,
        "n_skipped": len(done), "n_processed": processed, "seconds": seconds,
        "structures_per_s": processed / seconds if seconds > 0 else 0.0,
        "stage_seconds": stage_seconds, "invariant_ok": ok,
        "config": {k: v for k, v in asdict(config).items() if k != "validation"},
        "inference_threads": threads,
    }
    lock.check()
    manifest = _update_manifest(paths, config, model, attempt, out, n_inputs, ok)
    summary = ScreenSummary(
        run_id=paths.run_id, out=config.out, manifest_uri=paths.manifest, n_inputs=n_inputs,
        n_results=out["n_results"], n_rejects=out["n_rejects"], n_skipped=len(done),
        decisions=out["decisions"], reject_reasons=out["reject_reasons"], seconds=seconds,
        structures_per_s=attempt["structures_per_s"], stage_seconds=stage_seconds)
    if config.verbose:
        print(summary.table())
    if not ok:
        raise ScreenInvariantError(
            f"run {paths.run_id}: {out['n_results']} results + {out['n_rejects']} rejects != "
            f"{n_inputs} inputs, or duplicates (inputs {out['duplicate_inputs']}, result ids "
            f"{out['duplicate_result_ids']}); see {paths.manifest}" + _library_changed(config, source))
    log.debug("manifest %s", manifest)
    return summary


def _library_changed(config: ScreenConfig, source: Source) -> str:
    """An explanation for a broken invariant when the library's files changed during the run
    (a file rewritten or removed between the index pass and the read), else ""."""
    if source.files is None:
        return ""
    if library_fingerprint(config.library) == source.fingerprint:
        return ""
    return (". The library changed while it was screened (files rewritten, added or removed since "
            "it was listed); screen a library that stays put, under a new --run-id")


def _run_identity(paths: runs.RunPaths, config: ScreenConfig, model: dict[str, Any],
                  fingerprint: str) -> dict[str, Any]:
    """What a run is: its id, library (spec + fingerprint), model, references and DEST."""
    return {"run_id": paths.run_id, "library": config.library, "library_fingerprint": fingerprint,
            "model": model, "model_id": model["model_id"], "data_version": model["data_version"],
            "references": config.references, "dest": config.out}


def _write_start_record(paths: runs.RunPaths, config: ScreenConfig, model: dict[str, Any],
                        source: Source, started: str) -> None:
    """Record the run's library fingerprint and model in ``RUN.start`` before any row is
    written, so that a resume after a crash at any point can refuse another library. A resume
    keeps the record of the attempt that started the run (its fingerprint was just matched);
    the manifest stays what it was: written once an attempt has finished."""
    if config.resume and runs.read_json(paths.start) is not None:
        return
    runs.write_json(paths.start, {**_run_identity(paths, config, model, source.fingerprint),
                                  "started": started})


def _update_manifest(paths: runs.RunPaths, config: ScreenConfig, model: dict[str, Any],
                     attempt: dict[str, Any], out: dict[str, Any], n_inputs: int,
                     ok: bool) -> dict[str, Any]:
    previous = runs.read_json(paths.manifest) or {}
    attempts = [*previous.get("attempts", []), attempt]
    manifest = {
        **_run_identity(paths, config, model, attempt["library_fingerprint"]),
        # RUN.start holds the first attempt's start, also when that attempt crashed
        "started": (runs.read_json(paths.start) or {}).get("started", attempts[0]["started"]),
        "finished": attempt["finished"],
        "status": "complete" if ok else "invariant_violated",
        "n_inputs": n_inputs,
        "n_results": out["n_results"],
        "n_rejects": out["n_rejects"],
        "decisions": out["decisions"],
        "reject_reasons": out["reject_reasons"],
        "invariant": {"results_plus_rejects_equals_inputs": ok,
                      "duplicate_inputs": out["duplicate_inputs"],
                      "duplicate_result_ids": out["duplicate_result_ids"]},
        "stage_seconds": attempt["stage_seconds"],
        "structures_per_s": attempt["structures_per_s"],
        "versions": _versions(),
        "attempts": attempts,
    }
    runs.write_json(paths.manifest, manifest)
    return manifest
