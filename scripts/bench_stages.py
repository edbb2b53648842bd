"""Per-stage rates in one process, no Ray: CPU stages, graph size and unpickling, inference stage.

    PYTHONPATH=. python scripts/bench_stages.py --model MODEL_DIR --library LIB.parquet [--n 1024]
    python scripts/bench_stages.py --tree /path/to/other/checkout ...   # compare two versions

The screen's own stage classes on the first ``--n`` rows of a library file, one thread:

- *CPU stages*: ``ValidateStage`` + ``GraphStage`` (graphs, hull inputs, SOAP clusters);
- *graph bytes*: the graph stage's output pickled as Ray stores a block, per structure, and how fast
  it unpickles (Ray does that when it hands the inference actor its next batch);
- *inference stage*: ``InferenceStage`` (ensemble + calibration + OOD + triage) on those batches,
  best of ``--repeats``. With a tiny model (``bench_screen.py --model tiny-mace``) this is mostly the
  host work around the model, which a GPU actor pays on its critical path.

``--tree`` imports ``cathode_ray`` from another checkout, so two versions can be timed in turns
on the same machine (alternate them: single runs on a shared machine are noisy).
"""

from __future__ import annotations

import argparse
import pickle
import sys
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="calibrated model directory")
    ap.add_argument("--library", required=True, help="a library Parquet file")
    ap.add_argument("--references", default=f"snapshot:{SHARED / 'mp_reference_entries.jsonl.gz'}")
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--rows", type=int, default=256, help="rows per batch")
    ap.add_argument("--max-edges", type=int, default=400_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tree", default=None, help="checkout whose cathode_ray to time (default: this one)")
    args = ap.parse_args()
    if args.tree:
        sys.path.insert(0, str(Path(args.tree).resolve()))
    import torch
    from bench_feed import raw_batches  # after --tree: its cathode_ray is the one timed

    from cathode_ray.data.validate import ValidationConfig
    from cathode_ray.screen import stages

    torch.set_num_threads(1)
    raw = raw_batches(args.library, args.n, args.rows)
    validate = stages.ValidateStage(config=ValidationConfig())
    graph = stages.GraphStage(model=args.model, references=args.references)
    graph(validate(raw[0].copy()))  # warm-up: model load, first hulls
    t0 = time.perf_counter()
    batches = [graph(validate(r)) for r in raw]
    cpu_rate = args.n / (time.perf_counter() - t0)
    blobs = [pickle.dumps(b, protocol=5) for b in batches]
    t0 = time.perf_counter()
    batches = [pickle.loads(b) for b in blobs]
    unpickle_rate = args.n / (time.perf_counter() - t0)
    infer = stages.InferenceStage(model=args.model, device="cpu", max_edges=args.max_edges, run_id="bench")
    infer(batches[0].copy())
    best = 0.0
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        n = sum(len(infer(b.copy())) for b in batches)
        best = max(best, n / (time.perf_counter() - t0))
    print(f"tree={Path(stages.__file__).parents[2]} n={args.n}: CPU stages {cpu_rate:.0f}/s, "
          f"graph stage output {sum(map(len, blobs)) / args.n / 1024:.1f} KiB/structure, "
          f"unpickled {unpickle_rate:.0f}/s, inference stage {best:.0f}/s (best of {args.repeats})")


if __name__ == "__main__":
    main()
