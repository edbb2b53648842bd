"""Benchmark screening: structures/s end to end and busy seconds per stage, 1 vs 2 CPU actors.

    PYTHONPATH=. python scripts/bench_screen.py --model MODEL_DIR --references snapshot:PATH \
        [--n 1000] [--actors 1 2] [--out /tmp/bench_screen]

Each configuration screens the demo library (n structures) into a fresh run id on a private
local Ray and reports wall time, structures/s, busy seconds per stage and peak RSS of the
driver + Ray worker processes (sampled every 0.5 s).
"""

from __future__ import annotations

import argparse
import importlib
import threading
import time
from typing import Any


def _psutil() -> Any:
    """psutil as bundled with Ray (importing ray puts it on sys.path)."""
    import ray  # noqa: F401

    return importlib.import_module("psutil")


def _rss_sampler(stop: threading.Event, peak: list[int]) -> None:
    psutil = _psutil()
    me = psutil.Process()
    while not stop.wait(0.5):
        total = 0
        for p in [me, *me.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        peak[0] = max(peak[0], total)


def bench(model: str, references: str, n: int, actors: int, out: str, cpus: int) -> dict:
    """One configuration on a fresh local Ray; returns the figures."""
    import ray

    from cathode_ray.screen.pipeline import ScreenConfig, run

    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    stop, peak = threading.Event(), [0]
    sampler = threading.Thread(target=_rss_sampler, args=(stop, peak), daemon=True)
    sampler.start()
    try:
        t0 = time.perf_counter()
        # on a small box each CPU actor reserves a fraction so that graph + validate still fit
        per_actor = min(1.0, (cpus - 0.75) / actors)
        s = run(ScreenConfig(library="demo", demo_size=n, model=model, out=out,
                             references=references, run_id=f"bench-n{n}-a{actors}-{int(t0)}",
                             cpu_actors=actors, cpus_per_actor=per_actor, verbose=True))
        wall = time.perf_counter() - t0
    finally:
        stop.set()
        ray.shutdown()
    return {"actors": actors, "n": n, "wall_s": wall, "structures_per_s": n / wall,
            "results": s.n_results, "rejects": s.n_rejects, "stage_s": s.stage_seconds,
            "peak_rss_gb": peak[0] / 1e9}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--references", required=True)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--actors", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--cpus", type=int, default=_psutil().cpu_count() or 2)
    ap.add_argument("--out", default="/tmp/bench_screen")
    args = ap.parse_args()
    rows = [bench(args.model, args.references, args.n, a, args.out, args.cpus) for a in args.actors]
    print(f"\n{'actors':>6} {'n':>6} {'wall s':>8} {'struct/s':>9} {'peak RSS GB':>12}  "
          "busy s per stage (validate/graph/infer/calibrate)")
    for r in rows:
        st = r["stage_s"]
        print(f"{r['actors']:>6} {r['n']:>6} {r['wall_s']:>8.1f} {r['structures_per_s']:>9.2f} "
              f"{r['peak_rss_gb']:>12.2f}  {st['validate']:.1f}/{st['graph']:.1f}/"
              f"{st['infer']:.1f}/{st['calibrate']:.1f}")


if __name__ == "__main__":
    main()
