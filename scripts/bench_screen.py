"""Benchmark screening: structures/s end to end and per stage, 1 vs 2 inference actors, peak RSS.

    PYTHONPATH=. python scripts/bench_screen.py --model MODEL_DIR --references snapshot:PATH \
        [--library demo|PATH ...] [--n 1000] [--actors 1 2 | --cores 1 2] [--gpu-actors 0] \
        [--precision float32] [--compile-model off on] [--object-store-mb 128] [--trace DIR]

- ``--library demo`` (default) screens ``--n`` generated demo structures (built in memory);
  give one or more library paths (e.g. shards of ``cathode-ray library generate``) to screen
  files, which is what a 10k / 100k memory comparison needs (``--library lib/part-0000.parquet``
  vs ``--library lib``).
- ``--model tiny-mace`` trains a 2-member ensemble on a random-weight tiny MACE backbone first
  (about a minute): inference is then cheap, so the run measures the pipeline itself
  (reading, validation, graph building, batching, writing) and its memory at scale.
- ``--model mace-medium-shape`` trains a calibrated 5-member ensemble on a random-weight
  MACE-MP-0-medium-shaped backbone first (a few minutes on 2 CPUs): the screen at the real
  model's cost.
- ``--cores 1 2`` measures parallel efficiency: each run pins the whole screen (driver and every
  Ray process) to that many cores with one graph actor and one inference actor per core, so
  2 cores should screen twice as fast as 1.
- ``--compile-model off on`` screens each configuration uncompiled and with ``compile_model``
  (compiled trunk and last blocks; each inference actor compiles on its first batch, which counts).

Each configuration runs in a fresh Python process on a fresh private local Ray and reports wall time, structures/s, busy
seconds per stage, the inference stage's own rate (results / busy inference seconds per actor)
and the end-to-end rate as a share of it, and peak memory of the driver + Ray processes (sampled
every 0.5 s): RSS, and PSS, which counts shared pages (forked workers) once, with PSS per process
at its peak, and the peak use of /dev/shm, where Ray's object store keeps the queued blocks.
Ratios are only fair between rows of one run.
"""

from __future__ import annotations

import argparse
import importlib
import multiprocessing
import os
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from cathode_ray.screen.pipeline import ScreenConfig
from cathode_ray.testing.tiny_ensemble import build_medium_shape_ensemble

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def _psutil() -> Any:
    """psutil as bundled with Ray (importing ray puts it on sys.path)."""
    import ray  # noqa: F401

    return importlib.import_module("psutil")


def _label(p: Any) -> str:
    """Short process label: Ray worker title (``ray::MapBatches(GraphStage)``) or executable name."""
    try:
        cmd = p.cmdline()
    except Exception:  # noqa: BLE001 - process gone or not readable
        return "?"
    title = cmd[0] if cmd else p.name()
    return title.split(" ")[0][:40] if title.startswith("ray::") else p.name()[:20]


def _memory_sampler(stop: threading.Event, peak: dict[str, Any], trace: Path | None = None) -> None:
    """Every 0.5 s: total RSS and PSS of this process tree; keeps the peaks and, at the PSS peak,
    PSS per process label. PSS counts pages shared between processes (Ray's object store, forked
    workers) once, so it is the machine's real memory use; RSS double-counts them. With ``trace``,
    every sample's per-process PSS and USS (private pages) are appended to that CSV."""
    psutil = _psutil()
    me = psutil.Process()
    t0 = time.perf_counter()
    out = trace.open("a") if trace is not None else None
    while not stop.wait(0.5):
        rss = pss = 0
        by_label: dict[str, int] = {}
        now = time.perf_counter() - t0
        for p in [me, *me.children(recursive=True)]:
            try:
                info = p.memory_full_info()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            rss += info.rss
            pss += info.pss
            label = _label(p)
            by_label[label] = by_label.get(label, 0) + info.pss
            if out is not None:
                out.write(f"{now:.1f},{p.pid},{label},{info.pss},{info.uss}\n")
        peak["rss"] = max(peak.get("rss", 0), rss)
        # Ray's object store lives in /dev/shm: queued blocks are memory too
        peak["shm"] = max(peak.get("shm", 0), psutil.disk_usage("/dev/shm").used)
        if pss > peak.get("pss", 0):
            peak["pss"], peak["by_label"] = pss, by_label
    if out is not None:
        out.close()


def tiny_mace_model(workdir: Path, references: str) -> str:
    """A calibrated 2-member ensemble on a minimal random-weight MACE (r_max 4 A, 8x0e, l <= 1):
    about 100 structures/s per core, so the pipeline rather than the model is measured."""
    from cathode_ray.testing.tiny_ensemble import build_tiny_ensemble
    from cathode_ray.testing.tiny_mace import build_tiny_mace

    path = build_tiny_mace(workdir / "tiny.model", r_max=4.0, hidden_irreps="8x0e", max_ell=1,
                           correlation=1, radial_mlp=(8,), seed=0)
    return str(build_tiny_ensemble(workdir / "ensemble", summary=SHARED / "mp_litmo_summary.jsonl.gz",
                                   references=references, backbone=f"mace:{path}"))


def bench(*, model: str, references: str, library: str, n: int, actors: int, gpu_actors: int,
          out: str, cpus: int, precision: str, stack_members: bool, object_store_mb: float | None,
          compile_model: bool = False,
          cores: int | None = None, trace: Path | None = None,
          rows_per_file: int = ScreenConfig.min_rows_per_file,
          calls_per_actor: int | None = None) -> dict[str, Any]:
    """One configuration on a fresh local Ray; returns the figures.

    ``cores``: pin the driver, and so every Ray process it starts, to the first ``cores`` CPU
    cores, with ``cores`` read/validate tasks, graph actors and inference actors and ``2 * cores``
    logical CPUs (a worker = one core's share of every stage). ``trace``: per-process memory samples CSV
    (``seconds,pid,process,pss_bytes,uss_bytes``).
    """
    import ray

    from cathode_ray.screen.pipeline import ScreenConfig, run

    graph_actors = 1
    all_cores = os.sched_getaffinity(0)
    if cores is not None:
        os.sched_setaffinity(0, sorted(all_cores)[:cores])
        cpus, actors, graph_actors = 2 * cores, cores, cores
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    stop, peak = threading.Event(), {}
    sampler = threading.Thread(target=_memory_sampler, args=(stop, peak, trace), daemon=True)
    sampler.start()
    try:
        t0 = time.perf_counter()
        # each CPU inference actor reserves what graph actors (0.5 each) and light tasks leave
        per_actor = min(1.0, (cpus - 0.5 * graph_actors - 0.25) / actors)
        s = run(ScreenConfig(library=library, demo_size=n, model=model, out=out,
                             references=references, run_id=f"bench-a{actors}-g{gpu_actors}-{int(t0)}",
                             cpu_actors=actors, cpus_per_actor=per_actor, gpu_actors=gpu_actors,
                             graph_actors=graph_actors, light_tasks=graph_actors,
                             object_store_mb=object_store_mb, min_rows_per_file=rows_per_file,
                             inference_calls_per_actor=calls_per_actor,
                             precision=precision, stack_members=stack_members,
                             compile_model=compile_model, verbose=True))
        wall = time.perf_counter() - t0
    finally:
        stop.set()
        sampler.join()
        ray.shutdown()
        os.sched_setaffinity(0, all_cores)
    pool = gpu_actors or actors
    infer_rate = s.n_results / max(s.stage_seconds["infer"], 1e-9) * pool
    return {"library": library, "cores": cores, "actors": pool, "compiled": compile_model, "n": s.n_inputs, "wall_s": wall,
            "structures_per_s": s.n_inputs / wall, "results": s.n_results, "rejects": s.n_rejects,
            "stage_s": s.stage_seconds, "infer_rate": infer_rate,
            "peak_rss_gb": peak.get("rss", 0) / 1e9, "peak_pss_gb": peak.get("pss", 0) / 1e9,
            "peak_shm_gb": peak.get("shm", 0) / 1e9,
            "pss_by_process_gb": {k: v / 1e9 for k, v in sorted(peak.get("by_label", {}).items(),
                                                               key=lambda kv: -kv[1])}}


def _in_fresh_process(fn: Any, **kwargs: Any) -> Any:
    """``fn(**kwargs)`` in a new (spawned) Python process, as a user runs one screen per process.

    One driver process for every configuration would carry the previous screens' memory (loaded
    modules, allocator caches: +60 MB after a 10k screen) into the next one and bias the memory
    comparison of the rows.
    """
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        return pool.submit(fn, **kwargs).result()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", required=True,
                    help="model directory, 'tiny-mace' or 'mace-medium-shape'")
    ap.add_argument("--references", default=f"snapshot:{SHARED / 'mp_reference_entries.jsonl.gz'}")
    ap.add_argument("--library", nargs="+", default=["demo"], help="'demo' or library paths, one run each")
    ap.add_argument("--n", type=int, default=1000, help="structures of the demo library")
    ap.add_argument("--actors", type=int, nargs="+", default=[1, 2], help="CPU inference actors")
    ap.add_argument("--cores", type=int, nargs="+", default=None,
                    help="scaling runs: the whole screen pinned to N cores, N graph + N inference "
                         "actors (replaces --actors and --cpus); prints parallel efficiency")
    ap.add_argument("--gpu-actors", type=int, default=0, help="GPU inference actors (replaces --actors)")
    ap.add_argument("--cpus", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--precision", default="float32")
    ap.add_argument("--stack-members", action="store_true")
    ap.add_argument("--compile-model", nargs="+", choices=["off", "on"], default=["off"],
                    help="screen uncompiled (off), with the compiled trunk and last blocks (on), or both")
    ap.add_argument("--object-store-mb", type=float, default=ScreenConfig.object_store_mb,
                    help="object-store budget of the queued blocks (0: Ray Data's default)")
    ap.add_argument("--calls-per-actor", type=int, default=None,
                    help="concurrent calls per inference actor (default: ScreenConfig's, by actor kind)")
    ap.add_argument("--rows-per-file", type=int, default=ScreenConfig.min_rows_per_file,
                    help="rows the driver gathers per output file")
    ap.add_argument("--out", default=None, help="DEST (default: a temporary directory)")
    ap.add_argument("--trace", type=Path, default=None,
                    help="folder for per-process memory samples, one CSV per configuration")
    args = ap.parse_args()
    out = args.out or tempfile.mkdtemp(prefix="bench_screen_")
    if args.trace is not None:
        args.trace.mkdir(parents=True, exist_ok=True)
    model = args.model
    if model in ("tiny-mace", "mace-medium-shape"):
        t0 = time.perf_counter()
        workdir = Path(tempfile.mkdtemp(prefix=model.replace("-", "_") + "_"))
        model = (tiny_mace_model(workdir, args.references) if model == "tiny-mace" else str(
            build_medium_shape_ensemble(workdir, summary=SHARED / "mp_litmo_summary.jsonl.gz",
                                        references=args.references)))
        print(f"{args.model} ensemble built in {time.perf_counter() - t0:.0f} s: {model}", flush=True)
    if args.cores:
        configs = [(lib, c, c, comp) for lib in args.library for c in args.cores for comp in args.compile_model]
    else:
        configs = [(lib, a, None, comp) for lib in args.library
                   for a in ([args.gpu_actors] if args.gpu_actors else args.actors) for comp in args.compile_model]
    rows = [_in_fresh_process(
        bench, model=model, references=args.references, library=lib, n=args.n, actors=a,
        gpu_actors=args.gpu_actors, out=out, cpus=args.cpus, precision=args.precision,
        stack_members=args.stack_members, compile_model=comp == "on",
        object_store_mb=args.object_store_mb or None,
        cores=c, rows_per_file=args.rows_per_file,
        calls_per_actor=args.calls_per_actor, trace=None if args.trace is None
        else args.trace / f"memory-{i}-{Path(lib).name}-a{a}-c{c}-{comp}.csv")
        for i, (lib, a, c, comp) in enumerate(configs)]
    if args.trace is not None:
        print(f"memory samples: {args.trace}/memory-*.csv")
    print(f"\nmodel={args.model} precision={args.precision} stacked={args.stack_members} "
          f"cpus={'2 x cores' if args.cores else args.cpus} object_store_mb={args.object_store_mb} "
          f"rows_per_file={args.rows_per_file} calls_per_actor={args.calls_per_actor or 'default'}")
    print(f"{'cores':>5} {'actors':>6} {'compiled':>8} {'inputs':>7} {'wall s':>8} {'struct/s':>9} {'infer/s':>8} "
          f"{'e2e/infer':>9} {'peak RSS GB':>12} {'peak PSS GB':>12} {'shm GB':>7}  busy s per stage "
          "(validate/graph/infer/calibrate)  library")
    for r in rows:
        st = r["stage_s"]
        print(f"{r['cores'] or 'all':>5} {r['actors']:>6} {str(r['compiled']):>8} {r['n']:>7} {r['wall_s']:>8.1f} "
              f"{r['structures_per_s']:>9.2f} {r['infer_rate']:>8.2f} "
              f"{r['structures_per_s'] / r['infer_rate']:>9.2f} {r['peak_rss_gb']:>12.2f} "
              f"{r['peak_pss_gb']:>12.2f} {r['peak_shm_gb']:>7.2f}  {st['validate']:.1f}/{st['graph']:.1f}/"
              f"{st['infer']:.1f}/{st['calibrate']:.1f}  {r['library']}")
    for r in rows:
        parts = ", ".join(f"{k} {v:.2f}" for k, v in r["pss_by_process_gb"].items() if v >= 0.05)
        print(f"  PSS at peak by process (GB), {r['n']} inputs from {r['library']}: {parts}")
    if args.cores and len(rows) > 1:
        for r in rows:
            base = next(b for b in rows if b["compiled"] == r["compiled"] and b["library"] == r["library"])
            if r is base:
                continue
            speedup = r["structures_per_s"] / base["structures_per_s"]
            print(f"parallel efficiency {base['cores']} -> {r['cores']} cores: speed-up {speedup:.2f}x, "
                  f"efficiency {speedup * base['cores'] / r['cores']:.2f}")


if __name__ == "__main__":
    main()
