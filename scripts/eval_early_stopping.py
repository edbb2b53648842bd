"""What stopping members early on the calibration split costs: ``--early-stopping val`` vs ``holdout``.

    python scripts/eval_early_stopping.py --data out/litmo --out out/early_stopping [--members 5]

Needs a dataset from ``cathode-ray ingest --source snapshot:../shared/data/mp_litmo_summary.jsonl.gz``.
Trains two head-only ensembles (seeds 42, 43, ...; sequential, no Ray) that differ only in the rows
whose MAE stops each member: the val split, which then also fits the conformal offsets and triage
thresholds (the seed card), or 15 % of the training rows by formula group, so val only calibrates.
Each is calibrated on val and reported as ``cathode-ray report`` does. The printed table holds, per
split, Spearman, MAE (eV/atom), coverage of the 90 % interval, its median width (eV/atom), KEEP
precision and the false-kill rate. Val's own row is in-sample for calibration in both.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from cathode_ray.report.run import ReportConfig
from cathode_ray.report.run import run as report
from cathode_ray.train.ensemble import DEFAULT_CACHE, EnsembleTrainConfig
from cathode_ray.train.ensemble import run as train

REFS = "snapshot:../shared/data/mp_reference_entries.jsonl.gz"
COLUMNS = ("spearman", "mae", "coverage", "median_width", "keep_precision", "false_kill_rate")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="dataset directory (cathode-ray ingest)")
    ap.add_argument("--out", required=True, help="directory for the two models and reports")
    ap.add_argument("--references", default=REFS)
    ap.add_argument("--members", type=int, default=5)
    args = ap.parse_args()
    rows = []
    for mode in ("val", "holdout"):
        model = Path(args.out, f"model-{mode}")
        t0 = time.perf_counter()
        manifest = train(EnsembleTrainConfig(
            data=args.data, out=str(model), references=args.references, members=args.members,
            train_last_block=False, runner="local", early_stopping=mode, cache_dir=DEFAULT_CACHE))
        seconds = time.perf_counter() - t0
        rep = report(ReportConfig(model=str(model), data=args.data, references=args.references,
                                  out=str(Path(args.out, f"report-{mode}")), cache_dir=DEFAULT_CACHE))
        epochs = [m["best_epoch"] for m in manifest["members"]]
        print(f"{mode}: trained in {seconds:.0f} s, best epochs {epochs}, checks "
              f"{'PASS' if rep['passed'] else 'FAIL'}", flush=True)
        rows += [(mode, split, m) for split, m in rep["metrics"].items()]
    print("| early stopping | split | " + " | ".join(COLUMNS) + " |")
    print("|---|---|" + "---|" * len(COLUMNS))
    for mode, split, m in rows:
        print(f"| {mode} | {split} | " + " | ".join(f"{m[c]:.3f}" for c in COLUMNS) + " |")


if __name__ == "__main__":
    main()
