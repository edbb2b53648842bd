"""Benchmark: ensemble members concurrently on Ray Train vs one after another in-process.

Builds the frozen-trunk features once (CHGNet), then trains the same members twice:

* ``ray``: :func:`cathode_ray.train.ray_ensemble.train_members`, every member its own TorchTrainer,
  all at once (``--cpus-per-member`` sized so they fit, e.g. 0.4 x 5 on two cores);
* ``local``: :func:`cathode_ray.train.ray_ensemble.train_members_local`, one after another.

Prints both wall times and their ratio. Data: ``--n-train + --n-val`` real Materials Project
structures from ``../shared/data/mp_litmo_summary.jsonl.gz`` when present (at most ``--max-atoms``
sites, label ``energy_above_hull``), else strained LiMO2 prototypes with made-up labels.

Examples::

    PYTHONPATH=. python scripts/bench_train.py --n-train 64 --epochs 5 --cpus-per-member 0.4
    PYTHONPATH=. python scripts/bench_train.py --members 5 --gpus-per-member 0.2   # one GPU
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from cathode_ray import seedcard
from cathode_ray.model.member import Normalizer
from cathode_ray.train.loop import MemberData, TrainConfig
from cathode_ray.train.ray_ensemble import (
    MemberRun,
    RayTrainResources,
    train_members,
    train_members_local,
)

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mp_litmo_summary.jsonl.gz"


def real_structures(path: Path, n: int, max_atoms: int, seed: int) -> tuple[list, torch.Tensor]:
    """n random MP structures with at most max_atoms sites and their E_hull labels (eV/atom)."""
    from pymatgen.core import Structure

    docs = []
    with gzip.open(path, "rt") as f:
        for line in f:
            d = json.loads(line)
            if d.get("nsites", 10**9) <= max_atoms and d.get("energy_above_hull") is not None:
                docs.append(d)
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(docs), size=min(n, len(docs)), replace=False)
    structures = [Structure.from_dict(docs[i]["structure"]) for i in pick]
    y = torch.tensor([float(docs[i]["energy_above_hull"]) for i in pick])
    return structures, y


def synthetic_structures(n: int, seed: int) -> tuple[list, torch.Tensor]:
    """n strained 4-atom LiMO2 (M = Co/Ni/Mn/Fe) cells with made-up labels in 0..0.3 eV/atom."""
    from pymatgen.core import Lattice, Structure

    rng = np.random.default_rng(seed)
    protos = [("Co", 2.82, 14.05), ("Ni", 2.88, 14.19), ("Mn", 2.90, 14.30), ("Fe", 2.95, 14.50)]
    out = []
    for k in range(n):
        m, a, c = protos[k % len(protos)]
        s = Structure.from_spacegroup("R-3m", Lattice.hexagonal(a, c), ["Li", m, "O"],
                                      [[0, 0, 0.5], [0, 0, 0], [0, 0, 0.24]]).get_primitive_structure()
        s.apply_strain(rng.uniform(-0.03, 0.03, 3).tolist())
        out.append(s)
    return out, torch.tensor(rng.uniform(0.0, 0.3, n), dtype=torch.float32)


def build_member_data(structures: list, y: torch.Tensor, seed: int) -> MemberData:
    """Trunk features once; hull_pa = CHGNet energy - y + N(0, 0.02) noise (a learnable offset)."""
    from cathode_ray.model.backbones import load_backbone

    bb = load_backbone("chgnet")
    feats = []
    for start in range(0, len(structures), 16):
        feats += bb.trunk([bb.build_graph(s) for s in structures[start:start + 16]])
    with torch.no_grad():
        e_pa = torch.cat([bb.new_last_block()(bb.collate(feats[i:i + 64]))[0]
                          for i in range(0, len(feats), 64)])
    gen = torch.Generator().manual_seed(seed)
    n = len(structures)
    hull = e_pa.float() - y.float() + 0.02 * torch.randn(n, generator=gen)
    return MemberData(feats=feats, y=y.float(), hull_pa=hull, corr_pa=torch.zeros(n),
                      has_ref=torch.ones(n, dtype=torch.bool))


def subset(d: MemberData, idx: list[int]) -> MemberData:
    i = torch.tensor(idx)
    return MemberData(feats=[d.feats[j] for j in idx], y=d.y[i], hull_pa=d.hull_pa[i],
                      corr_pa=d.corr_pa[i], has_ref=d.has_ref[i])


def summarize(name: str, runs: list[MemberRun], wall: float, called_at: float) -> None:
    """Wall time, and its split: launch (call -> first member training), training (first start ->
    last end, all members) and collection (last end -> return)."""
    epoch_s = sum(h["seconds"] for r in runs for h in r.fit.history)
    t0, t1 = min(r.started_at for r in runs), max(r.ended_at for r in runs)
    print(f"{name:>6}: wall {wall:7.1f} s = launch {t0 - called_at:5.1f} + training {t1 - t0:5.1f} + "
          f"collect {called_at + wall - t1:5.1f} s | sum of epoch times {epoch_s:6.1f} s | "
          f"restarts {sum(r.restarts for r in runs)}")
    for r in runs:
        print(f"        member {r.index} seed {r.seed}: window [{r.started_at - t0:6.1f}, "
              f"{r.ended_at - t0:6.1f}] s, epochs {r.fit.epochs_run}, best val MAE "
              f"{r.fit.val_mae:.4f} eV/atom")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--members", type=int, default=len(seedcard.SEEDS))
    ap.add_argument("--n-train", type=int, default=64)
    ap.add_argument("--n-val", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--max-atoms", type=int, default=24)
    ap.add_argument("--cpus-per-member", type=float, default=0.4)
    ap.add_argument("--gpus-per-member", type=float, default=0.0)
    ap.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray instance")
    ap.add_argument("--address", default=None, help="Ray cluster address (default: local)")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--synthetic", action="store_true", help="prototype cells even if data exists")
    ap.add_argument("--skip-local", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    n = args.n_train + args.n_val
    t = time.perf_counter()
    if args.data.is_file() and not args.synthetic:
        structures, y = real_structures(args.data, n, args.max_atoms, args.seed)
        source = f"{len(structures)} real MP structures (<= {args.max_atoms} sites) from {args.data.name}"
    else:
        structures, y = synthetic_structures(n, args.seed)
        source = f"{n} synthetic LiMO2 cells"
    data = build_member_data(structures, y, args.seed)
    train, val = subset(data, list(range(args.n_train))), subset(data, list(range(args.n_train, len(data))))
    print(f"data: {source}; trunk features once in {time.perf_counter() - t:.1f} s "
          f"({sum(len(s) for s in structures)} atoms)")
    normalizer = Normalizer.fit(train.y)
    seeds = [seedcard.SEEDS[i % len(seedcard.SEEDS)] + 100 * (i // len(seedcard.SEEDS))
             for i in range(args.members)]
    device = "cuda" if args.gpus_per_member > 0 else "cpu"
    configs = [TrainConfig(seed=s, max_epochs=args.epochs, patience=args.epochs, device=device)
               for s in seeds]

    import ray

    t = time.perf_counter()
    if args.address is None:
        ray.init(address="local", num_cpus=args.num_cpus or os.cpu_count(), include_dashboard=False,
                 log_to_driver=False)
    else:
        ray.init(address=args.address, log_to_driver=False)
    t_init = time.perf_counter() - t
    resources = RayTrainResources(address=args.address, cpus_per_member=args.cpus_per_member,
                                  gpus_per_member=args.gpus_per_member)
    t, ray_called = time.perf_counter(), time.time()
    ray_runs = train_members("chgnet", train, val, normalizer, configs, resources)
    t_ray = time.perf_counter() - t
    ray.shutdown()

    t_local = float("nan")
    if not args.skip_local:
        t, local_called = time.perf_counter(), time.time()
        local_runs = train_members_local("chgnet", train, val, normalizer, configs)
        t_local = time.perf_counter() - t

    print(f"\n{args.members} members x {args.epochs} epochs, {len(train)} train / {len(val)} val, "
          f"cpus/member {args.cpus_per_member}, gpus/member {args.gpus_per_member}, "
          f"torch threads local {torch.get_num_threads()}, host CPUs {os.cpu_count()}, "
          f"load avg {os.getloadavg()[0]:.1f}")
    print(f"ray.init {t_init:.1f} s (not counted)")
    summarize("ray", ray_runs, t_ray, ray_called)
    if not args.skip_local:
        summarize("local", local_runs, t_local, local_called)
        print(f"\nspeed-up local/ray = {t_local / t_ray:.2f}x  (ray {t_ray:.1f} s vs local {t_local:.1f} s)")


if __name__ == "__main__":
    main()
