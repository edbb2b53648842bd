"""Do the CPU stages keep the inference device fed? End to end on one node, without Ray.

    python scripts/bench_feed.py --model MODEL --library LIB.parquet --n 3072 --workers 15 \
        [--device cuda] [--batch-rows 32 256] [--max-edges 50000 400000] [--compile-model]

The screen's own stage classes (``cathode_ray.screen.stages``) in the same order as the Ray Data
pipeline, with a process pool in place of Ray (for nodes where Ray is not installed, such as a
borrowed GPU box):

1. *CPU stages*: ``--workers`` processes read + validate + build graphs and hull inputs
   (``ValidateStage``, ``GraphStage``) for the library twice: cold (a fresh screen: every worker
   builds each chemical system's hull once) and warm (steady state of a long screen).
2. *inference stage alone*: on those graphs, ``InferenceStage`` (ensemble + calibration + OOD +
   triage) on batches of ``--batch-rows`` rows split by the ``--max-edges`` budget, per setting:
   the rate the device can deliver.
3. *end to end*: the same warm workers feed ``InferenceStage`` (best setting of 2) in the main
   process as batches arrive, and ``ScreenWriter`` writes Parquet (results + rejects = inputs
   checked); once per ``--calls-per-actor`` (2: the next batch is unpickled in a thread while the
   model runs, as Ray Data does for a GPU actor with two concurrent calls).

``--model mace-medium-shape`` first trains a calibrated 5-member ensemble (2 epochs, 60 small MP
materials) on a random-weight MACE-MP-0-medium-shaped backbone on ``--device``: random weights cost
the same as trained ones, and a 45 MB backbone need not be carried to a borrowed node.

Prints structures/s for each and the ratio end to end / inference alone (the issue's target on a
GPU node: >= 0.8). All figures come from one run. ``--compile-model`` runs the inference stage
with the compiled trunk and last blocks; every ``InferenceStage`` is warmed up (and so compiled) on
one batch before it is timed.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import pickle
import tempfile
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq

from cathode_ray.data.validate import ValidationConfig
from cathode_ray.screen import stages
from cathode_ray.testing.tiny_ensemble import build_medium_shape_ensemble

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"

_graph_stage: stages.GraphStage | None = None  # one per pool worker
_limits: Any = None  # keeps the worker's BLAS thread limit alive


def _init_worker(model: str, references: str) -> None:
    """Load the CPU stages once per worker process, one thread each (the workers are the
    parallelism; Ray sets ``OMP_NUM_THREADS`` for its workers the same way). The first GPU run
    (2026-11-27) limited torch alone: numpy/BLAS threads oversubscribed the 16 cores."""
    global _graph_stage, _limits
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(1)
    _limits = threadpool_limits(1)
    _graph_stage = stages.GraphStage(model=model, references=references)


def _cpu_stages(raw: pd.DataFrame) -> bytes:
    """Validate + graph stages on one raw batch, pickled here (as Ray serialises a block into its
    object store): multiprocessing's own pickler would pass every tensor as a file descriptor."""
    assert _graph_stage is not None
    return pickle.dumps(_graph_stage(stages.ValidateStage(config=ValidationConfig())(raw)), protocol=5)


def raw_batches(library: str, n: int, rows: int) -> list[pd.DataFrame]:
    """The first ``n`` rows of a library Parquet file as raw-row batches of ``rows`` rows."""
    items = pd.DataFrame([{"path": library, "file_index": 0, "row_start": 0,
                           "row_stop": min(n, pq.ParquetFile(library).metadata.num_rows)}])
    return list(stages.read_file_chunks(items, chunk_rows=rows))


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def inference_alone(model: str, graphs: list[pd.DataFrame], *, device: str, max_edges: int,
                    precision: str, compile_model: bool = False) -> float:
    """Structures/s of ``InferenceStage`` on pre-built graph batches (one warm-up batch first)."""
    stage = stages.InferenceStage(model=model, device=device, max_edges=max_edges, run_id="bench",
                                  precision=precision, compile_model=compile_model)
    stage(graphs[0].copy())
    _sync(device)
    t0 = time.perf_counter()
    n = sum(len(stage(g.copy())) for g in graphs)
    _sync(device)
    return n / (time.perf_counter() - t0)


def _unpickled(blocks: Iterator[bytes], ahead: int) -> Iterator[pd.DataFrame]:
    """Unpickle the graph blocks, ``ahead`` of them in a thread while the caller runs the model:
    what Ray Data's ``max_concurrent_calls_per_actor`` = ahead + 1 does for an inference actor
    (the model itself still runs one call at a time)."""
    if ahead < 1:
        yield from (pickle.loads(b) for b in blocks)
        return
    with ThreadPoolExecutor(max_workers=1) as thread:
        queued: deque[Future[pd.DataFrame]] = deque()
        for b in blocks:
            queued.append(thread.submit(pickle.loads, b))
            if len(queued) > ahead:
                yield queued.popleft().result()
        while queued:
            yield queued.popleft().result()


def end_to_end(pool: ProcessPoolExecutor, model: str, raw: list[pd.DataFrame], *, device: str,
               max_edges: int, precision: str, out: Path, warm_up: pd.DataFrame, calls: int = 1,
               compile_model: bool = False) -> tuple[float, dict[str, Any]]:
    """Structures/s from raw rows to Parquet, ``pool`` feeding the device (``calls`` as the
    inference actor's concurrent calls: see :func:`_unpickled`); the stage is warmed up (and
    compiled) on the graph batch ``warm_up`` first, untimed and not written."""
    stage = stages.InferenceStage(model=model, device=device, max_edges=max_edges, run_id="bench",
                                  precision=precision, compile_model=compile_model)
    stage(warm_up.copy())
    _sync(device)
    writer = stages.ScreenWriter(results_uri=str(out / "results"), rejects_uri=str(out / "rejects"),
                                 run_id="bench")
    t0 = time.perf_counter()
    for graphs in _unpickled(pool.map(_cpu_stages, raw), ahead=calls - 1):
        writer.write(stage(graphs))
    writer.flush()
    _sync(device)
    seconds = time.perf_counter() - t0
    n_in = sum(len(r) for r in raw)
    if writer.stats["results"] + writer.stats["rejects"] != n_in:
        raise RuntimeError(f"rows lost: {writer.stats} for {n_in} inputs")
    return n_in / seconds, writer.stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="model directory, or 'mace-medium-shape'")
    ap.add_argument("--library", required=True, help="a library Parquet file")
    ap.add_argument("--references", default=f"snapshot:{SHARED / 'mp_reference_entries.jsonl.gz'}")
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    ap.add_argument("--batch-rows", type=int, nargs="+", default=[32])
    ap.add_argument("--max-edges", type=int, nargs="+", default=[12_500])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="float32")
    ap.add_argument("--calls-per-actor", type=int, nargs="+", default=[1, 2],
                    help="end to end with each: the inference actor's concurrent calls")
    ap.add_argument("--compile-model", action="store_true",
                    help="the inference stage with the compiled trunk and last blocks")
    args = ap.parse_args()
    import torch

    if args.model == "mace-medium-shape":
        t0 = time.perf_counter()
        args.model = str(build_medium_shape_ensemble(
            Path(tempfile.mkdtemp(prefix="medium_shape_")), summary=SHARED / "mp_litmo_summary.jsonl.gz",
            references=args.references, device=args.device))
        print(f"medium-shape ensemble trained in {time.perf_counter() - t0:.0f} s", flush=True)
    torch.set_grad_enabled(False)  # after training the model above
    pool = ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_init_worker, initargs=(args.model, args.references))
    print(f"device={args.device} cpus={os.cpu_count()} workers={args.workers} n={args.n} "
          f"model={args.model} compiled={args.compile_model}", flush=True)
    rows: list[str] = []
    with pool:
        list(pool.map(_cpu_stages, raw_batches(args.library, args.workers, 1)))  # load the workers
        graphs: list[pd.DataFrame] = []
        for name in ("cold", "warm"):
            raw = raw_batches(args.library, args.n, 64)
            t0 = time.perf_counter()
            graphs = [pickle.loads(b) for b in pool.map(_cpu_stages, raw)]
            n = sum(len(g) for g in graphs)
            rows.append(f"CPU stages, {args.workers} workers, {name}: {n / (time.perf_counter() - t0):8.1f} "
                        "structures/s")
            print(rows[-1], flush=True)
        allg = pd.concat(graphs, ignore_index=True)
        print(f"mean edges/structure {allg['n_edges'].dropna().mean():.0f}", flush=True)
        alone: dict[tuple[int, int], float] = {}
        for br in args.batch_rows:
            batches = [allg.iloc[i:i + br].reset_index(drop=True) for i in range(0, n, br)]
            for me in args.max_edges:
                r = inference_alone(args.model, batches, device=args.device, max_edges=me,
                                    precision=args.precision, compile_model=args.compile_model)
                alone[(br, me)] = r
                rows.append(f"inference alone, batch_rows={br:4d} max_edges={me:7d}: {r:8.1f} structures/s")
                print(rows[-1], flush=True)
        br, me = max(alone, key=alone.__getitem__)
        for calls in args.calls_per_actor:
            with tempfile.TemporaryDirectory() as tmp:
                r, stats = end_to_end(pool, args.model, raw_batches(args.library, args.n, br),
                                      device=args.device, max_edges=me, precision=args.precision,
                                      out=Path(tmp), warm_up=allg.iloc[:br].reset_index(drop=True),
                                      calls=calls, compile_model=args.compile_model)
            rows.append(f"end to end, {args.workers} workers, batch_rows={br} max_edges={me} "
                        f"calls_per_actor={calls}: {r:8.1f} structures/s = {r / alone[(br, me)]:.2f} "
                        f"of inference alone ({stats['results']} results + {stats['rejects']} rejects)")
            print(rows[-1], flush=True)
    print("\n".join(["", "summary:", *rows]))


if __name__ == "__main__":
    main()
