"""One member on the real snapshot: training time and quality, head-only vs last-block.

    python scripts/bench_member.py --data out/litmo [--epochs 15] [--backbone chgnet]

Needs a dataset from ``cathode-ray ingest --source snapshot:../shared/data/mp_litmo_summary.jsonl.gz``.
Prints, for each mode, wall time of ``fit_member`` and val/test/loco MAE (eV/atom) and Spearman, next to
the backbone's zero-shot E_hull on the same rows. The trunk runs once (cached) before either mode.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from cathode_ray.model.backbones import load_backbone
from cathode_ray.model.member import Member, Normalizer
from cathode_ray.train.ensemble import prepare
from cathode_ray.train.loop import TrainConfig, fit_member, predict_member, spearman

REFS = "snapshot:../shared/data/mp_reference_entries.jsonl.gz"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--backbone", default="chgnet")
    ap.add_argument("--references", default=REFS)
    ap.add_argument("--epochs", type=int, default=15, help="max epochs for the last-block member")
    ap.add_argument("--seed", type=int, default=42)
    args = ap.parse_args()
    bb = load_backbone(args.backbone)
    t0 = time.perf_counter()
    prep = prepare(args.data, bb, args.references)
    print(f"prepare (trunk once + hulls): {time.perf_counter() - t0:.1f} s, {len(prep.ids)} structures, "
          f"threads={torch.get_num_threads()}")
    parts = {k: prep.part(k) for k in ("train", "val", "test", "loco")}
    norm = Normalizer.fit(parts["train"].y)
    for mode, tlb, epochs in (("head-only", False, 200), ("last-block", True, args.epochs)):
        cfg = TrainConfig(seed=args.seed, train_last_block=tlb, max_epochs=epochs)
        t0 = time.perf_counter()
        res = fit_member(bb, parts["train"], parts["val"], cfg, normalizer=norm)
        wall = time.perf_counter() - t0
        member = Member.create(bb, cfg.head, norm)
        member.load_state_dict(res.member_state)
        line = [f"{mode:>10}: {wall:7.1f} s, {res.epochs_run} epochs (best {res.best_epoch})"]
        for name in ("val", "test", "loco"):
            d = parts[name]
            p = predict_member(member, bb, d)
            y = d.y.numpy()
            zs = np.nan_to_num(p["zero_shot"])
            line.append(f"{name} MAE {np.mean(np.abs(p['q50'] - y)):.4f} rho {spearman(p['q50'], y):.3f} "
                        f"(zero-shot {np.mean(np.abs(zs - y)):.4f}/{spearman(zs, y):.3f})")
        print(" | ".join(line), flush=True)


if __name__ == "__main__":
    main()
