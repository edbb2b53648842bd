"""How far reduced precision moves five-member predictions against float32, on real structures.

    python scripts/bench_precision.py [--n 64] [--backbone chgnet|mace:PATH] [--device cuda] [--tree DIR]

For each precision the screen offers (``Ensemble.precision_deviation``: the precision on the
members' last blocks, float32 everywhere else), prints the largest and mean change of energy
(eV/atom) and q50 (eV/atom) against float32, and whether it is within the seed-card bound the
screen enforces (``seedcard.PRECISION_MAX_DEVIATION``).

- On CUDA: ``tf32`` and ``bf16`` as the hardware runs them.
- On CPU: ``bf16`` (CPU kernels), and ``tf32`` emulated (``cathode_ray.testing.tf32``: matmul
  inputs rounded to TF32 wherever the TF32 flag is on), rounding to nearest and truncating.

Structures are real MP Li-TM-O materials from ../shared/data; members are the pretrained last
block perturbed per member (``bench_ensemble.bench_ensemble``). ``--tree`` imports
``cathode_ray`` from another checkout (a version before a change), so two can be compared.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--members", type=int, default=5)
    ap.add_argument("--backbone", default="chgnet")
    ap.add_argument("--device", default=None)
    ap.add_argument("--tree", default=None, help="import cathode_ray from this checkout")
    args = ap.parse_args()
    if args.tree:
        sys.path.insert(0, str(Path(args.tree).resolve()))
    import torch
    from bench_ensemble import _backbone, _structures, bench_ensemble  # after --tree

    from cathode_ray import seedcard
    from cathode_ray.model.member import ThermoInputs
    from cathode_ray.testing.tf32 import emulated_tf32

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_grad_enabled(False)
    bb = _backbone(args.backbone, device)
    ens = bench_ensemble(bb, args.members, device)
    graphs = [bb.build_graph(s) for s in _structures(args.n)]
    chunks = [graphs[i:i + args.batch] for i in range(0, len(graphs), args.batch)]
    batches = [bb.trunk_batch(c, device) for c in chunks]
    thermo = [ThermoInputs(hull_pa=torch.zeros(len(c)), corr_pa=torch.zeros(len(c)),
                           has_ref=torch.ones(len(c), dtype=torch.bool)).to(device) for c in chunks]

    def outputs(precision: str) -> dict[str, torch.Tensor]:  # each [M, N]
        outs = [ens.member_outputs(b, t, precision) for b, t in zip(batches, thermo, strict=True)]
        return {k: torch.cat([o[k].double() for o in outs], dim=1) for k in ("energy_pa", "q50")}

    ref = outputs("float32")
    cases: list[tuple[str, str, contextlib.AbstractContextManager[None]]] = []
    if device.startswith("cuda"):
        cases += [("tf32", "tf32", contextlib.nullcontext()), ("bf16", "bf16", contextlib.nullcontext())]
    else:
        cases += [("bf16", "bf16", contextlib.nullcontext()),
                  ("tf32 (emulated, round)", "tf32", emulated_tf32("round")),
                  ("tf32 (emulated, truncate)", "tf32", emulated_tf32("truncate"))]
    bound = seedcard.PRECISION_MAX_DEVIATION
    print(f"backbone={bb.name} device={device} structures={args.n} members={args.members} "
          f"tree={args.tree or 'this checkout'}")
    for label, precision, ctx in cases:
        with ctx:
            low = outputs(precision)
        d = {k: (low[k] - ref[k]).abs() for k in ref}
        worst = max(float(v.max()) for v in d.values())
        print(f"{label:>26}: energy max {1e3 * float(d['energy_pa'].max()):.3f} mean "
              f"{1e3 * float(d['energy_pa'].mean()):.3f} | q50 max {1e3 * float(d['q50'].max()):.3f} "
              f"mean {1e3 * float(d['q50'].mean()):.3f} meV/atom | "
              f"{'within' if worst <= bound else 'OVER'} the {1e3 * bound:.0f} meV/atom bound")


if __name__ == "__main__":
    main()
