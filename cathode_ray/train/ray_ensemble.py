"""The five-member ensemble on Ray Train: every member is its own fault-tolerant Ray Train run,
and all members run at the same time.

Design (Ray 2.60, where Ray Train V2 is the default: ``RAY_TRAIN_V2_ENABLED`` defaults to on):

* **One ``TorchTrainer`` per member** with ``ScalingConfig(num_workers=1)``. A member is small
  (the last block + head on cached trunk features), so data-parallel workers inside one member
  would only add all-reduce traffic; the parallelism is *across* members.
* **Members are launched concurrently from driver threads**, each thread blocking in its own
  ``trainer.fit()``. In Train V2, ``fit()`` only creates a zero-CPU controller actor and waits on
  it; the training itself happens in the worker actors, so a driver thread costs nothing and
  holds no cluster resources. ``DataParallelTrainer.fit`` explicitly supports being called off
  the main thread (it then skips installing its SIGINT handler, which is what happens under
  Tune). Alternatives considered: Ray Tune as the parallel runner (the V2 Train+Tune pattern runs
  ``trainer.fit()`` inside a Tune trial) adds a trial actor per member that reserves resources,
  a second experiment directory layout and a search/scheduler layer we do not need (the five
  configurations are fixed, not searched); wrapping ``fit()`` in a Ray task needs a zero-CPU
  task per member and moves the launcher off the driver for no gain. Threads keep one Train run
  per member with its own ``FailureConfig``, checkpoints and ``Result``.
* **Features are shared, not recomputed**: the caller computes the frozen-trunk features once;
  :func:`train_members` puts the train and validation :class:`MemberData` into the object store
  once (``ray.put``) and passes the ObjectRefs to every member through ``train_loop_config``.
  Each worker ``ray.get``s them and loads the backbone itself (needed for ``collate`` and the
  member's copy of the last block; CHGNet loads in about a second from the wheel).
* **Fault tolerance**: each epoch the worker saves :attr:`EpochReport.state` with ``torch.save``
  and calls ``ray.train.report(metrics, checkpoint=...)``. When a worker dies, Ray Train restarts
  the worker group (up to ``FailureConfig(max_failures)``) and the new worker resumes from
  ``ray.train.get_checkpoint()`` with the same data order and optimiser state (see
  :func:`cathode_ray.train.loop.fit_member`). At the end the worker reports the best state
  (the :class:`FitResult`) as the final checkpoint, which the driver reads back from
  ``result.checkpoint`` with ``torch.load(..., weights_only=True)``.
* **Restart accounting**: every worker attempt writes a small marker file under
  ``<storage>/<group>/_markers/member<i>/``; ``MemberRun.restarts`` is the number of attempts
  minus one. The test-only crash injection (``crash_once_at_epoch``) uses a marker in the same
  place so the restarted worker does not crash again. Markers go through pyarrow filesystems
  (:func:`cathode_ray.storage.filesystem_for`), so ``s3://`` storage works too.

Resources: ``cpus_per_member`` x members must fit in the cluster for all members to run at once
(e.g. 0.4 CPU each for five members on two cores); otherwise members queue for their placement
group, and a member whose worker group cannot start within
``RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S`` (60 s by default) may be failed by Ray Train
(not exercised in the tests). ``gpus_per_member`` decides the
device: a member gets ``ray.train.torch.get_device()`` when it has a GPU share and ``"cpu"``
otherwise (``TrainConfig.device`` is overridden accordingly).

:func:`train_members_local` runs the same members one after another in this process, without
Ray (baseline for ``scripts/bench_train.py`` and for notebooks).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from cathode_ray.model.backbones import load_backbone
from cathode_ray.model.member import Normalizer
from cathode_ray.storage import filesystem_for, is_remote

from .loop import EpochReport, FitResult, MemberData, TrainConfig, fit_member

logger = logging.getLogger(__name__)

#: File name of the torch.save payload inside every checkpoint directory.
CHECKPOINT_FILE = "member.pt"


@dataclass(frozen=True, kw_only=True)
class RayTrainResources:
    """Where and with what each member runs.

    ``address``: ``None`` starts a local Ray instance (``ray.init(address="local")``) unless Ray is
    already initialised in this process; ``"auto"`` or ``ray://host:10001`` joins a cluster.
    ``gpus_per_member``: 1 = a GPU per member, 0.2 = five members share one GPU, 0 = CPU.
    ``max_failures``: worker deaths a member survives (it resumes from its last checkpoint).
    ``storage_path``: RunConfig storage (local directory or ``s3://bucket/prefix``); default a
    temporary directory that is removed when :func:`train_members` returns.
    """

    address: str | None = None
    gpus_per_member: float = 0.0
    cpus_per_member: float = 1.0
    max_failures: int = 2
    storage_path: str | None = None

    def __post_init__(self) -> None:
        if self.gpus_per_member < 0:
            raise ValueError("gpus_per_member must be >= 0")
        if self.gpus_per_member > 1 and self.gpus_per_member != int(self.gpus_per_member):
            raise ValueError("gpus_per_member above 1 must be a whole number")
        if self.cpus_per_member <= 0:
            raise ValueError("cpus_per_member must be > 0")
        if self.max_failures < 0:
            raise ValueError("max_failures must be >= 0 (use 0 to disable restarts)")
        if self.address is not None and not self.address.strip():
            raise ValueError("address must be None, 'auto', a host:port or a ray:// URI")

    @property
    def use_gpu(self) -> bool:
        return self.gpus_per_member > 0


@dataclass(frozen=True, kw_only=True)
class MemberRun:
    """One trained member.

    ``fit.member_state`` is the best trainable state dict (last block + head, CPU tensors);
    ``started_at``/``ended_at`` are wall-clock seconds (``time.time()``) of the member's training
    (first attempt start to end, measured where it trained); ``restarts`` counts worker restarts
    and ``resumed_after_epochs`` the epoch whose checkpoint each resumed attempt continued from;
    ``checkpoint_path`` is the final checkpoint's location when the storage outlives the call
    (``None`` for the temporary default storage and for the local runner).
    """

    index: int
    seed: int
    fit: FitResult
    started_at: float
    ended_at: float
    restarts: int
    resumed_after_epochs: tuple[int, ...] = ()
    checkpoint_path: str | None = None

    def __post_init__(self) -> None:
        if self.ended_at < self.started_at:
            raise ValueError("ended_at must not precede started_at")
        if self.restarts < 0:
            raise ValueError("restarts must be >= 0")


@dataclass(frozen=True, kw_only=True)
class _WorkerSpec:
    """Everything one member's worker needs besides the data refs (picklable)."""

    index: int
    backbone_spec: str
    config: TrainConfig
    normalizer: Normalizer
    use_gpu: bool
    torch_threads: int
    marker_uri: str  # <storage>/<group>/_markers/member<i>
    crash_at_epoch: int | None


class InjectedCrash(RuntimeError):
    """Raised by :func:`train_members_local` to simulate a crash in-process."""


# --------------------------------------------------------------------------- checkpoints
def _fit_payload(fit: FitResult, *, started_at: float, ended_at: float,
                 resumed_after: list[int]) -> dict[str, Any]:
    return {"resumed_after": resumed_after,
        "kind": "final", "member_state": fit.member_state, "best_epoch": fit.best_epoch,
        "epochs_run": fit.epochs_run, "val_mae": fit.val_mae, "val_spearman": fit.val_spearman,
        "history": fit.history, "started_at": started_at, "ended_at": ended_at,
    }


def _fit_from_payload(payload: dict[str, Any]) -> FitResult:
    return FitResult(
        member_state=payload["member_state"], best_epoch=int(payload["best_epoch"]),
        epochs_run=int(payload["epochs_run"]), val_mae=float(payload["val_mae"]),
        val_spearman=float(payload["val_spearman"]), history=list(payload["history"]),
    )


def load_checkpoint_payload(directory: str) -> dict[str, Any]:
    """The dict saved in a member checkpoint directory (``torch.load`` with weights_only=True)."""
    return torch.load(os.path.join(directory, CHECKPOINT_FILE), map_location="cpu", weights_only=True)


# --------------------------------------------------------------------------- markers
def _touch(uri: str) -> None:
    fs, path = filesystem_for(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(b"1")


def _exists(uri: str) -> bool:
    import pyarrow.fs as pafs

    fs, path = filesystem_for(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def _count_attempts(marker_uri: str) -> int:
    import pyarrow.fs as pafs

    fs, path = filesystem_for(marker_uri)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sum(1 for i in infos if i.base_name.startswith("attempt-"))


def _join(uri: str, *parts: str) -> str:
    out = uri.rstrip("/")
    for p in parts:
        out = f"{out}/{p.strip('/')}"
    return out


# --------------------------------------------------------------------------- worker
def _member_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train worker loop of one member (runs inside the Train worker actor)."""
    import ray
    import ray.train

    spec: _WorkerSpec = loop_config["spec"]
    _touch(_join(spec.marker_uri, f"attempt-{time.time_ns()}-{uuid.uuid4().hex[:8]}"))
    torch.set_num_threads(spec.torch_threads)
    train_data: MemberData = ray.get(loop_config["train_ref"])
    val_data: MemberData = ray.get(loop_config["val_ref"])

    started_at, resume, resumed_after = time.time(), None, []
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            payload = load_checkpoint_payload(d)
        if payload["kind"] == "final":  # died after its last report: the result is already saved
            return
        started_at, resume = float(payload["started_at"]), payload["state"]
        resumed_after = [*payload["resumed_after"], int(resume["epoch"])]

    if spec.use_gpu:
        import ray.train.torch

        device = str(ray.train.torch.get_device())
    else:
        device = "cpu"
    config = dataclasses.replace(spec.config, device=device)
    backbone = load_backbone(spec.backbone_spec, device=device)
    crash_marker = _join(spec.marker_uri, "crash-injected")

    def on_epoch(report: EpochReport) -> None:
        metrics = {"member": spec.index, "seed": config.seed, "epoch": report.epoch,
                   "train_loss": report.train_loss, "val_mae": report.val_mae,
                   "val_spearman": report.val_spearman, "seconds": report.seconds}
        with tempfile.TemporaryDirectory(prefix="cathode_ray_ckpt_") as d:
            torch.save({"kind": "epoch", "state": report.state, "started_at": started_at,
                        "resumed_after": resumed_after},
                       os.path.join(d, CHECKPOINT_FILE))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d),
                             checkpoint_dir_name=f"epoch_{report.epoch:04d}")
        if spec.crash_at_epoch == report.epoch and not _exists(crash_marker):
            # Make sure the controller has committed this epoch's checkpoint before dying.
            ray.train.get_all_reported_checkpoints(
                consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED, timeout_s=60)
            _touch(crash_marker)
            logger.warning("member %d: injected crash after epoch %d", spec.index, report.epoch)
            os._exit(1)

    fit = fit_member(backbone, train_data, val_data, config, normalizer=spec.normalizer,
                     resume=resume, on_epoch=on_epoch)
    with tempfile.TemporaryDirectory(prefix="cathode_ray_ckpt_") as d:
        torch.save(_fit_payload(fit, started_at=started_at, ended_at=time.time(),
                                resumed_after=resumed_after),
                   os.path.join(d, CHECKPOINT_FILE))
        ray.train.report({"member": spec.index, "seed": config.seed, "final": 1,
                          "best_epoch": fit.best_epoch, "val_mae": fit.val_mae},
                         checkpoint=ray.train.Checkpoint.from_directory(d),
                         checkpoint_dir_name="final")


# --------------------------------------------------------------------------- driver
def _validate(configs: Sequence[TrainConfig], crash: dict[int, int]) -> None:
    if not configs:
        raise ValueError("configs must hold at least one TrainConfig")
    seeds = [c.seed for c in configs]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"member seeds must differ, got {seeds}")
    for i, epoch in crash.items():
        if not 0 <= i < len(configs):
            raise ValueError(f"crash_once_at_epoch names member {i}, but there are {len(configs)}")
        if not 0 <= epoch < configs[i].max_epochs:
            raise ValueError(f"crash epoch {epoch} of member {i} is outside 0..max_epochs-1")


def _ensure_ray(address: str | None) -> bool:
    """Initialise Ray when needed; returns whether this call started it."""
    import ray

    if os.environ.get("RAY_TRAIN_V2_ENABLED", "1").strip().lower() in ("0", "false", "no", "off"):
        raise RuntimeError("train_members needs Ray Train V2 (the default in Ray 2.60); unset "
                           "RAY_TRAIN_V2_ENABLED=0 in this environment")

    if ray.is_initialized():
        return False
    ray.init(address="local" if address is None else address, include_dashboard=False,
             log_to_driver=True)
    return True


def _warn_if_oversubscribed(n: int, resources: RayTrainResources) -> None:
    import ray

    total = ray.cluster_resources()
    need_cpu, need_gpu = n * resources.cpus_per_member, n * resources.gpus_per_member
    if need_cpu > total.get("CPU", 0.0) + 1e-9 or need_gpu > total.get("GPU", 0.0) + 1e-9:
        logger.warning(
            "%d members need %.2f CPU / %.2f GPU but the cluster has %.2f CPU / %.2f GPU: members "
            "will queue (and fail after RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S if they wait too "
            "long); lower cpus_per_member/gpus_per_member to run them all at once",
            n, need_cpu, need_gpu, total.get("CPU", 0.0), total.get("GPU", 0.0))


def _fit_one(spec: _WorkerSpec, refs: dict[str, Any], resources: RayTrainResources,
             storage: str, group: str) -> MemberRun:
    """Run one member's TorchTrainer to completion (called in a driver thread)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    res: dict[str, float] = {"CPU": resources.cpus_per_member}
    if resources.use_gpu:
        res["GPU"] = resources.gpus_per_member
    fs, root = filesystem_for(storage)
    run_config = RunConfig(
        name=f"member{spec.index}-seed{spec.config.seed}",
        storage_path=f"{root}/{group}",
        storage_filesystem=fs if is_remote(storage) else None,
        failure_config=FailureConfig(max_failures=resources.max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=2),
    )
    trainer = TorchTrainer(
        _member_worker,
        train_loop_config={"spec": spec, **refs},
        scaling_config=ScalingConfig(num_workers=1, use_gpu=resources.use_gpu,
                                     resources_per_worker=res),
        run_config=run_config,
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"member {spec.index} finished without a checkpoint")
    with result.checkpoint.as_directory() as d:
        payload = load_checkpoint_payload(d)
    if payload.get("kind") != "final":
        raise RuntimeError(f"member {spec.index}: last checkpoint is not the final result")
    return MemberRun(
        index=spec.index, seed=spec.config.seed, fit=_fit_from_payload(payload),
        started_at=float(payload["started_at"]), ended_at=float(payload["ended_at"]),
        restarts=max(_count_attempts(spec.marker_uri) - 1, 0),
        resumed_after_epochs=tuple(int(e) for e in payload["resumed_after"]),
        checkpoint_path=_join(storage, group, run_config.name or "", "final"),
    )


def train_members(
    backbone_spec: str,
    train: MemberData,
    val: MemberData,
    normalizer: Normalizer,
    configs: Sequence[TrainConfig],
    resources: RayTrainResources,
    *,
    crash_once_at_epoch: dict[int, int] | None = None,
) -> list[MemberRun]:
    """Train one member per config concurrently, each as its own fault-tolerant Ray Train run.

    ``train``/``val`` hold the cached frozen-trunk features (computed once by the caller) and go
    into the object store once. ``crash_once_at_epoch={member_index: epoch}`` (tests) hard-exits
    that member's worker right after its checkpoint of ``epoch`` is committed, once; the member
    restarts from that checkpoint. Returns the members in config order; raises ``RuntimeError``
    naming the failed members if any member exhausts ``max_failures``.
    """
    import ray

    crash = dict(crash_once_at_epoch or {})
    _validate(configs, crash)
    started_ray = _ensure_ray(resources.address)
    temp_storage = resources.storage_path is None
    storage = resources.storage_path or tempfile.mkdtemp(prefix="cathode_ray_train_")
    group = f"ensemble-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    try:
        _warn_if_oversubscribed(len(configs), resources)
        refs = {"train_ref": ray.put(train), "val_ref": ray.put(val)}
        threads = max(1, int(resources.cpus_per_member))
        specs = [
            _WorkerSpec(index=i, backbone_spec=backbone_spec, config=cfg, normalizer=normalizer,
                        use_gpu=resources.use_gpu, torch_threads=threads,
                        marker_uri=_join(storage, group, "_markers", f"member{i}"),
                        crash_at_epoch=crash.get(i))
            for i, cfg in enumerate(configs)
        ]
        with ThreadPoolExecutor(max_workers=len(specs), thread_name_prefix="cathode-member") as pool:
            futures = [pool.submit(_fit_one, s, refs, resources, storage, group) for s in specs]
            runs: list[MemberRun] = []
            errors: list[tuple[int, BaseException]] = []
            for i, fut in enumerate(futures):
                try:
                    runs.append(fut.result())
                except Exception as exc:  # collect all, report together
                    errors.append((i, exc))
        if errors:
            detail = "; ".join(f"member {i}: {type(e).__name__}: {e}" for i, e in errors)
            raise RuntimeError(f"{len(errors)} of {len(specs)} members failed: {detail}") from errors[0][1]
        if temp_storage:
            runs = [dataclasses.replace(r, checkpoint_path=None) for r in runs]
        return runs
    finally:
        if temp_storage:
            shutil.rmtree(storage, ignore_errors=True)
        if started_ray:
            ray.shutdown()


def train_members_local(
    backbone_spec: str,
    train: MemberData,
    val: MemberData,
    normalizer: Normalizer,
    configs: Sequence[TrainConfig],
    *,
    crash_once_at_epoch: dict[int, int] | None = None,
) -> list[MemberRun]:
    """Train the members one after another in this process (no Ray).

    Same inputs and result shape as :func:`train_members`. ``crash_once_at_epoch`` simulates a
    crash in-process: the member's run is abandoned right after that epoch's state is captured
    and resumed from it (``restarts`` = 1), exercising the same resume path.
    """
    crash = dict(crash_once_at_epoch or {})
    _validate(configs, crash)
    backbone = load_backbone(backbone_spec)
    runs: list[MemberRun] = []
    for i, cfg in enumerate(configs):
        started_at, restarts = time.time(), 0
        resumed: tuple[int, ...] = ()
        last: dict[str, Any] = {}
        crashed = threading.Event()

        def on_epoch(report: EpochReport, _i: int = i, _last: dict[str, Any] = last,
                     _crashed: threading.Event = crashed) -> None:
            _last["state"] = report.state
            if crash.get(_i) == report.epoch and not _crashed.is_set():
                _crashed.set()
                raise InjectedCrash(f"member {_i}: injected crash after epoch {report.epoch}")

        try:
            fit = fit_member(backbone, train, val, cfg, normalizer=normalizer, on_epoch=on_epoch)
        except InjectedCrash:
            restarts = 1
            resumed = (int(last["state"]["epoch"]),)
            fit = fit_member(backbone, train, val, cfg, normalizer=normalizer,
                             resume=last["state"], on_epoch=on_epoch)
        runs.append(MemberRun(index=i, seed=cfg.seed, fit=fit, started_at=started_at,
                              ended_at=time.time(), restarts=restarts,
                              resumed_after_epochs=resumed))
    return runs


__all__ = [
    "CHECKPOINT_FILE", "InjectedCrash", "MemberRun", "RayTrainResources", "load_checkpoint_payload",
    "train_members", "train_members_local",
]
