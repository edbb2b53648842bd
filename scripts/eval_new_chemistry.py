"""Held-out chemistry: the ensemble, the backbone's zero-shot E_hull and the shipped fallback on chemistry never trained on.

    python scripts/eval_new_chemistry.py --data out/litmo [--hold-out clusters|chemsys] [--members 3]

Needs a dataset from ``cathode-ray ingest --source snapshot:../shared/data/mp_litmo_summary.jsonl.gz``.
Folds: each of the three largest SOAP clusters (``--hold-out clusters``), or each fifth of the
chemical systems (``--hold-out chemsys``: structure families stay in training, element sets do
not). Per fold, head-only members (seeds 42, 43, ...) are trained on the train rows outside it
(early stopping on the val rows outside it), calibrated on those val rows, and evaluated on every
held-out row outside the dataset's LOCO split (which is left out of everything, so this is
evidence independent of the report's LOCO row). Printed per fold, with and without the zero-shot
fallback on new chemical systems (``cathode_ray.calibrate.fallback``): MAE (eV/atom) and Spearman
of the estimate (and of the zero-shot E_hull alone), the 90 % interval's coverage, the triage's
KEEP fraction and precision and its false-kill rate, and the fraction of rows with an element set
absent from training.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from cathode_ray.calibrate.calibrator import Calibrator, CalibratorConfig
from cathode_ray.calibrate.metrics import coverage, decision_metrics, mae, spearman
from cathode_ray.model.backbones import load_backbone
from cathode_ray.model.ensemble import Ensemble
from cathode_ray.model.head import HeadConfig
from cathode_ray.model.member import Member, Normalizer, ThermoInputs
from cathode_ray.model.prediction import EnsemblePrediction
from cathode_ray.train.ensemble import PreparedData, prepare
from cathode_ray.train.features import subset
from cathode_ray.train.loop import TrainConfig, fit_member

REFS = "snapshot:../shared/data/mp_reference_entries.jsonl.gz"


def _predict(ens: Ensemble, prep: PreparedData, idx: np.ndarray) -> EnsemblePrediction:
    d = subset(prep.data, idx)
    return ens.predict_feats_batched(d.feats, ThermoInputs(hull_pa=d.hull_pa, corr_pa=d.corr_pa, has_ref=d.has_ref))


def held_out(prep: PreparedData, bb, inside: np.ndarray, seeds: list[int]) -> dict[str, float]:
    """Train without the rows ``inside`` [N] bool, evaluate on them; metrics in eV/atom."""
    tr = np.flatnonzero((prep.split == "train") & ~inside)
    va = np.flatnonzero((prep.split == "val") & ~inside)
    ev = np.flatnonzero(inside & (prep.split != "loco"))
    train, val = subset(prep.data, tr), subset(prep.data, va)
    norm = Normalizer.fit(train.y)
    members = []
    for seed in seeds:
        cfg = TrainConfig(seed=seed, head=HeadConfig(mode="delta"), train_last_block=False)
        m = Member.create(bb, cfg.head, norm)
        m.load_state_dict(fit_member(bb, train, val, cfg, normalizer=norm).member_state)
        members.append(m.eval())
    ens = Ensemble(backbone=bb, members=members, normalizer=norm, uri="", files={},
                   manifest={"model_id": "held-out", "config": {"train_last_block": False}})
    comps = lambda idx: [prep.compositions[i] for i in idx]  # noqa: E731
    y = lambda idx: prep.data.y.numpy()[idx].astype(float)  # noqa: E731
    p_tr, p_va, p_ev = _predict(ens, prep, tr), _predict(ens, prep, va), _predict(ens, prep, ev)
    out: dict[str, float] = {"rows": len(ev), "train_rows": len(tr)}
    for name, fallback in (("ensemble", False), ("shipped", True)):
        cal = Calibrator.fit(p_va, y(va), prep.clusters[va], comps(va), p_tr, comps(tr),
                             CalibratorConfig(zero_shot_fallback=fallback))
        r = cal.apply(p_ev, prep.clusters[ev], comps(ev))
        out[f"{name}_mae"], out[f"{name}_rho"] = mae(y(ev), r["e_hull_pred"]), spearman(y(ev), r["e_hull_pred"])
        out[f"{name}_cov"] = coverage(y(ev), r["e_hull_lo"], r["e_hull_hi"])
        dm = decision_metrics(y(ev), r["decision"])
        out[f"{name}_keep"], out[f"{name}_keep_prec"] = dm["frac_keep"], dm["keep_precision"]
        out[f"{name}_false_kill"] = dm["false_kill_rate"]
        if fallback:
            out["new_chemistry"] = float(np.mean(r["e_hull_source"] == "zero_shot"))
            r_va = cal.apply(p_va, prep.clusters[va], comps(va))
            out["val_new_chemistry"] = float(np.mean(r_va["e_hull_source"] == "zero_shot"))
    zs = p_ev.zero_shot_ehull
    ok = np.isfinite(zs)
    out["zero_shot_mae"], out["zero_shot_rho"] = mae(y(ev)[ok], zs[ok]), spearman(y(ev)[ok], zs[ok])
    return out


def _chemsys(comp: dict[str, float]) -> str:
    return "-".join(sorted(comp))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--backbone", default="chgnet")
    ap.add_argument("--references", default=REFS)
    ap.add_argument("--hold-out", choices=("clusters", "chemsys"), default="clusters",
                    help="clusters: one SOAP cluster per fold; chemsys: every chemical system "
                         "split into --folds groups (same structure families, new element sets)")
    ap.add_argument("--clusters", type=int, nargs="*", default=None,
                    help="clusters to hold out in turn (default: the three largest outside LOCO)")
    ap.add_argument("--folds", type=int, default=5, help="chemsys folds (seeded, by chemical system)")
    ap.add_argument("--members", type=int, default=3, help="head-only members per fold (seeds 42, 43, ...)")
    args = ap.parse_args()
    bb = load_backbone(args.backbone)
    prep = prepare(args.data, bb, args.references)
    if args.hold_out == "clusters":
        if args.clusters is None:
            c, n = np.unique(prep.clusters[prep.split != "loco"], return_counts=True)
            args.clusters = sorted(int(x) for x in c[np.argsort(-n)[:3]])
        folds = {f"cluster {c}": prep.clusters == c for c in args.clusters}
    else:
        systems = np.array([_chemsys(c) for c in prep.compositions])
        names = np.random.default_rng(42).permutation(np.unique(systems[prep.split != "loco"]))
        folds = {f"chemsys fold {k}": np.isin(systems, names[k::args.folds]) for k in range(args.folds)}
    print(f"{len(prep.ids)} structures, threads={torch.get_num_threads()}; held out: {', '.join(folds)}; "
          f"{args.members} head-only members per fold (MAE eV/atom, Spearman, 90 % coverage)")
    cols = ("rows", "new_chemistry", "val_new_chemistry", "ensemble_mae", "zero_shot_mae", "shipped_mae",
            "ensemble_rho", "zero_shot_rho", "shipped_rho", "ensemble_cov", "shipped_cov",
            "ensemble_keep", "shipped_keep", "ensemble_keep_prec", "shipped_keep_prec",
            "ensemble_false_kill", "shipped_false_kill")
    print("| held out | " + " | ".join(cols) + " | seconds |")
    print("|---" * (len(cols) + 2) + "|")
    for name, inside in folds.items():
        t0 = time.perf_counter()
        r = held_out(prep, bb, inside, [42 + i for i in range(args.members)])
        cells = [f"{r[k]:.0f}" if k == "rows" else f"{r[k]:.3f}" for k in cols]
        print(f"| {name} | " + " | ".join(cells) + f" | {time.perf_counter() - t0:.0f} |", flush=True)


if __name__ == "__main__":
    main()
