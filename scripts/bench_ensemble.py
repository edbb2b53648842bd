"""Five-member inference cost: naive vs shared trunk vs head-only, in one run (fair ratios).

    python scripts/bench_ensemble.py --n 64 [--backbone chgnet|mace-medium-shape|mace:PATH] [--device cuda]

Every mode runs the trunk as the screen does (``Backbone.trunk_batch``: its output stays on the
device), except *shared via host*, which splits it per structure into host memory and re-collates
it (``collate(trunk(...))``, the path of cached training features and of the screen before).

- naive: every member runs the whole backbone (trunk + its last block + head), one after another;
- shared loop: the frozen trunk runs once, the five last blocks + heads on its output in turn;
- shared via host: the shared loop with the trunk's output round-tripped through host memory;
- shared stacked: trunk once, the five last blocks + heads as one vectorised call (``Ensemble``
  with ``stack_members=True``, ``torch.func.vmap`` over stacked weights);
- compiled members: the shared loop with the last blocks run by one ``torch.compile``d function
  (``Ensemble.member_outputs`` with ``compile_model=True``; the trunk uncompiled);
- compiled: trunk and last blocks compiled (``Ensemble.trunk_batch`` too: the screen's path with
  ``--compile-model``; compile times are printed apart);
- head-only: trunk once, the pretrained last block once, five heads; and the same compiled;
- one member: trunk + one last block + head (the floor the others are compared with);
- shared stacked at each ``--precisions`` entry (bf16 on CPU and CUDA, tf32 on CUDA), with the
  largest change of q50 / energy against float32 (eV/atom) on the benchmark structures.

Structures are real MP Li-TM-O materials from ../shared/data (random weights cost the same as
trained ones; last blocks are perturbed per member so members differ). Prints structures/s per
mode (the median of ``--rounds`` interleaved rounds) and the ratios to naive, all from one run.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from pymatgen.core import Structure

from cathode_ray.model.backbones import Backbone, load_backbone
from cathode_ray.model.ensemble import Ensemble
from cathode_ray.model.head import HeadConfig
from cathode_ray.model.member import Member, Normalizer, ThermoInputs

SNAPSHOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "mp_litmo_summary.jsonl.gz"


def _structures(n: int) -> list[Structure]:
    out = []
    with gzip.open(SNAPSHOT, "rt") as f:
        for line in f:
            doc = json.loads(line)
            if doc["nsites"] <= 60:
                out.append(Structure.from_dict(doc["structure"]))
            if len(out) == n:
                break
    return out


def _backbone(spec: str, device: str) -> Backbone:
    if spec == "mace-medium-shape":
        from cathode_ray.testing.tiny_mace import build_medium_shape_mace

        spec = f"mace:{build_medium_shape_mace(Path(tempfile.mkdtemp()) / 'medium_shape.model')}"
    return load_backbone(spec, device=device)


def bench_ensemble(bb: Backbone, n_members: int, device: str) -> Ensemble:
    """``n_members`` stacked last-block members (seeds 42...), each last block perturbed by ~1 %
    of its weights' scale so that members differ, as trained ones do."""
    norm = Normalizer(mean=0.08, std=0.07)
    dim = bb.embedding_dim + bb.trunk_embedding_dim
    members = []
    for i in range(n_members):
        torch.manual_seed(42 + i)
        m = Member(bb.new_last_block(), dim, HeadConfig(), norm).to(device).eval()
        with torch.no_grad():
            for p in m.last_block.parameters():
                p.add_(0.01 * torch.randn_like(p) * p.abs().mean())
        members.append(m)
    return Ensemble(backbone=bb, members=members, normalizer=norm, uri="-", files={}, stack_members=True,
                    manifest={"model_id": "bench", "config": {"train_last_block": True}})


def _timed(fn, repeats: int, *, warm_up: bool = True) -> float:
    if warm_up:
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--members", type=int, default=5)
    ap.add_argument("--backbone", default="chgnet")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=2, help="timed passes per mode and round")
    ap.add_argument("--rounds", type=int, default=3,
                    help="rounds over all modes; each mode's rate is its median round")
    ap.add_argument("--precisions", nargs="*", default=None,
                    help="reduced precisions to time and bound (default: bf16, plus tf32 on CUDA)")
    args = ap.parse_args()
    precisions = args.precisions if args.precisions is not None else (
        ["tf32", "bf16"] if args.device.startswith("cuda") else ["bf16"])
    torch.set_grad_enabled(False)
    bb = _backbone(args.backbone, args.device)
    structures = _structures(args.n)
    graphs = [bb.build_graph(s) for s in structures]
    ens = bench_ensemble(bb, args.members, args.device)
    members = ens.members
    chunks = [graphs[i:i + args.batch] for i in range(0, len(graphs), args.batch)]
    th = {len(c): ThermoInputs(hull_pa=torch.zeros(len(c)), corr_pa=torch.zeros(len(c)),
                              has_ref=torch.ones(len(c), dtype=torch.bool)).to(args.device) for c in chunks}
    trunk_cache = [bb.trunk(c, device=args.device) for c in chunks]

    def one_member() -> None:
        for c in chunks:
            members[0](bb.trunk_batch(c, args.device), th[len(c)])

    def naive() -> None:
        for m in members:
            for c in chunks:
                m(bb.trunk_batch(c, args.device), th[len(c)])

    def shared() -> None:
        for c in chunks:
            batch = bb.trunk_batch(c, args.device)
            for m in members:
                m(batch, th[len(c)])

    def shared_via_host() -> None:  # the trunk's output split per structure and re-collated
        for c in chunks:
            batch = bb.collate(bb.trunk(c, device=args.device), args.device)
            for m in members:
                m(batch, th[len(c)])

    def stacked(precision: str = "float32") -> None:
        for c in chunks:
            batch = bb.trunk_batch(c, args.device)
            ens.member_outputs(batch, th[len(c)], precision)

    ens_loop = dataclasses.replace(ens, stack_members=False, _stacked=None)
    ens_compiled = dataclasses.replace(ens_loop, compile_model=True)
    head_only_config = {**ens.manifest, "config": {"train_last_block": False}}
    ens_head_compiled = dataclasses.replace(ens_compiled, manifest=head_only_config, _compiled=None)

    def compiled_members() -> None:
        for c in chunks:
            ens_compiled.member_outputs(bb.trunk_batch(c, args.device), th[len(c)])

    def compiled() -> None:
        for c in chunks:
            ens_compiled.member_outputs(ens_compiled.trunk_batch(c, args.device), th[len(c)])

    def head_only_compiled() -> None:
        for c in chunks:
            ens_head_compiled.member_outputs(ens_head_compiled.trunk_batch(c, args.device), th[len(c)])

    def head_only() -> None:
        for c in chunks:
            batch = bb.trunk_batch(c, args.device)
            x, zs, e = members[0].head_inputs(batch, th[len(c)])
            for m in members:
                m.outputs(x, zs, e, th[len(c)].has_ref)

    def last_blocks_only() -> None:  # trunk cached: what each training epoch pays
        for feats, c in zip(trunk_cache, chunks, strict=True):
            batch = bb.collate(feats, args.device)
            for m in members:
                m(batch, th[len(c)])

    def trunk_only() -> None:
        for c in chunks:
            bb.trunk_batch(c, args.device)

    def trunk_compiled() -> None:
        for c in chunks:
            ens_compiled.trunk_batch(c, args.device)

    batches = [bb.collate(f, args.device) for f in trunk_cache]
    inputs = [members[0].head_inputs(b, th[len(c)]) for b, c in zip(batches, chunks, strict=True)]

    def last_block_only() -> None:
        for b in batches:
            members[0].last_block(b)

    def head_only_cached() -> None:
        for (x, zs, e), c in zip(inputs, chunks, strict=True):
            members[0].outputs(x, zs, e, th[len(c)].has_ref)

    t0 = time.perf_counter()
    diff = max(float((ens_compiled.member_outputs(ens_compiled.trunk_batch(c, args.device), th[len(c)])["q50"]
                      - ens_loop.member_outputs(b, th[len(c)])["q50"]).abs().max())
               for b, c in zip(batches, chunks, strict=True))
    print(f"compiled trunk + members: first pass (compiles) {time.perf_counter() - t0:.1f} s, "
          f"max |q50 - uncompiled| = {1e3 * diff:.4f} meV/atom"
          + (f"  (FELL BACK: {ens_compiled.compile_failures})" if ens_compiled.compile_failures else ""))
    for name, fn in (("trunk", trunk_only), ("trunk, compiled", trunk_compiled), ("last block", last_block_only),
                     ("head", head_only_cached)):
        print(f"per structure, one member, {name:>15}: {1e3 * _timed(fn, args.repeats) / args.n:8.2f} ms")
    modes = [("one_member", one_member), ("naive_5", naive), ("shared_loop_5", shared),
             ("shared_via_host_5", shared_via_host), ("shared_stacked_5", stacked),
             ("compiled_members_5", compiled_members), ("compiled_5", compiled), ("head_only_5", head_only),
             ("head_only_compiled_5", head_only_compiled), ("cached_trunk_5", last_blocks_only)]
    deviations = {}
    for p in precisions:
        deviations[p] = max(ens.precision_deviation(b, th[len(c)], precision=p)
                            for b, c in zip(batches, chunks, strict=True))
        if deviations[p] != float("inf"):
            modes.append((f"stacked_5_{p}", lambda p=p: stacked(p)))
    for _, fn in modes:  # warm-up (and compile) every mode first
        fn()
    times: dict[str, list[float]] = {name: [] for name, _ in modes}
    for _ in range(args.rounds):  # modes interleaved, so a slow spell of the machine hits them all
        for name, fn in modes:
            times[name].append(_timed(fn, args.repeats, warm_up=False))
    rates = {name: args.n / statistics.median(ts) for name, ts in times.items()}
    spread = {name: (args.n / max(ts), args.n / min(ts)) for name, ts in times.items()}
    if ens.stack_members is False:
        print("NOTE: stacking fell back to the member loop for this backbone")
    print(f"backbone={bb.name} device={args.device} n={args.n} batch={args.batch} "
          f"threads={torch.get_num_threads()}")
    for name, r in rates.items():
        lo, hi = spread[name]
        print(f"{name:>18}: {r:8.1f} structures/s   x{r / rates['naive_5']:.2f} vs naive   "
              f"x{r / rates['one_member']:.2f} vs one member   (rounds {lo:.1f}-{hi:.1f})")
    for p, d in deviations.items():
        print(f"{p}: max |q50 or energy - float32| = "
              f"{'unsupported by this backbone' if d == float('inf') else f'{1e3 * d:.2f} meV/atom'}")


if __name__ == "__main__":
    main()
