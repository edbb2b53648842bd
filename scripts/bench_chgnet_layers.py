"""CHGNet's network: chgnet's own convolution modules vs the factored gated MLPs (``chgnet_layers``).

    PYTHONPATH=. python scripts/bench_chgnet_layers.py [--n 64] [--per-call 4 16 64] [--device cpu|cuda]

On ``--n`` real MP Li-TM-O structures from ``../shared/data`` (at most 60 sites), split into calls of
``--per-call`` structures (the screen's CPU sub-batches of 12,500 edges hold ~4 such structures;
GPU sub-batches of 400,000 edges ~130), in one run so the ratios are fair:

- the trunk (embeddings + first three convolutions): ms per structure, best of ``--repeats``;
- the last atom convolution (what a last-block member runs): ms per structure;
- matmul work per structure (GFLOP, counted by ``torch.utils.flop_counter``);
- the largest difference of the trunk's outputs, relative to their largest value.

glibc malloc is set as in the screen's inference actors (``screen.malloc.retain_freed_memory``);
``--default-malloc`` keeps glibc's defaults, under which large calls spend much of their time in
page faults and the timings swing from run to run.
"""

from __future__ import annotations

import argparse
import gzip
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from bench_chgnet_batch import best_time  # scripts/ is on sys.path when a script runs

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def _matmul_gflop(fn: Callable[[], Any]) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    def addmm_(self_shape: Any, a_shape: Any, b_shape: Any, out_shape: Any = None, **_: Any) -> int:
        return 2 * a_shape[0] * a_shape[1] * b_shape[1]  # as addmm (the in-place op is not in torch's registry)

    in_place = {torch.ops.aten.addmm_: addmm_}
    with FlopCounterMode(display=False, custom_mapping=in_place) as counter:
        fn()
    return counter.get_total_flops() / 1e9


@torch.inference_mode()
def _compare(m: Any, batches: list[tuple[torch.Tensor, ...]], repeats: int,
             sync: Callable[[], None]) -> tuple[float, dict[bool, tuple[float, float, float]]]:
    """(largest relative difference of the trunk outputs, {factored: (trunk s, last conv s, matmul
    GFLOP)} over all ``batches``)."""
    from cathode_ray.model.backbones.chgnet import _atom_conv, trunk_tensors

    outs = {f: [trunk_tensors(m, *t, factored=f) for t in batches] for f in (False, True)}
    rel = max(float((a - b).abs().max()) / float(b.abs().max())
              for new, old in zip(outs[True], outs[False], strict=True) for a, b in zip(new, old, strict=True))
    last = m.atom_conv_layers[-1]
    row = {}
    for factored in (False, True):
        def trunk(factored: bool = factored) -> None:
            for t in batches:
                trunk_tensors(m, *t, factored=factored)

        def last_conv(factored: bool = factored) -> None:
            for t, (atom_feas, bond_feas, weights) in zip(batches, outs[False], strict=True):
                kwargs = {"atom_feas": atom_feas, "bond_feas": bond_feas, "bond_weights": weights,
                          "atom_graph": t[4], "directed2undirected": t[5]}
                _atom_conv(last, **kwargs) if factored else last(**kwargs)

        row[factored] = (best_time(trunk, repeats, sync), best_time(last_conv, repeats, sync), _matmul_gflop(trunk))
    return rel, row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=64, help="structures in all")
    ap.add_argument("--per-call", type=int, nargs="+", default=[4, 16, 64], help="structures per call")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--default-malloc", action="store_true", help="keep glibc's malloc defaults")
    args = ap.parse_args()
    from pymatgen.core import Structure

    from cathode_ray.model.backbones.chgnet import ChgnetBackbone, _graph_tensors
    from cathode_ray.screen.malloc import retain_freed_memory

    torch.set_num_threads(1)
    retained = False if args.default_malloc else retain_freed_memory()
    structures = []
    with gzip.open(SHARED / "mp_litmo_summary.jsonl.gz", "rt") as fh:
        for line in fh:
            doc = json.loads(line)
            if doc["nsites"] <= 60:
                structures.append(Structure.from_dict(doc["structure"]))
            if len(structures) == args.n:
                break
    bb = ChgnetBackbone(device=args.device)
    m = bb.model
    graphs = [bb.build_graph(s) for s in structures]
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    print(f"device={args.device} torch={torch.__version__} structures={len(structures)} "
          f"malloc={'retains freed memory' if retained else 'defaults'}")
    for k in args.per_call:
        batches = [_graph_tensors(bb._batch_graphs(graphs[i:i + k], dev)[1]) for i in range(0, len(graphs), k)]
        rel, row = _compare(m, batches, args.repeats, sync)
        (t0, l0, f0), (t1, l1, f1) = (tuple(x / len(graphs) for x in row[f]) for f in (False, True))
        print(f"{k:>3} structures per call | trunk ms/structure chgnet {t0 * 1e3:.2f}, factored {t1 * 1e3:.2f} "
              f"({t0 / t1:.2f}x) | last conv {l0 * 1e3:.2f} vs {l1 * 1e3:.2f} ({l0 / l1:.2f}x) | matmul GFLOP/"
              f"structure {f0:.3f} vs {f1:.3f} | max rel. difference {rel:.1e}")


if __name__ == "__main__":
    main()
