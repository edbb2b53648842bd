"""CHGNet graph assembly: chgnet's own ``BatchedGraph.from_graphs`` vs :func:`batch_graphs`.

    PYTHONPATH=. python scripts/bench_chgnet_batch.py [--n 64] [--device cpu|cuda]

On ``--n`` real MP Li-TM-O structures from ``../shared/data``, for each way of assembling one batch
(composition features included): time per structure (best of ``--repeats``), tensor operations per
batch and scalar reads (``aten::_local_scalar_dense``: on a GPU, a wait for the device) per batch,
counted with the torch profiler; ``batch_graphs`` also split into its host part (small CPU tensors)
and its device part. chgnet's loop runs all of its operations on the device, where each is a kernel
launch, so the operation count is what a CPU run can say about a GPU; ``--device cuda`` times it
there. Also the pickled size of the graphs (what the screen moves between processes) and how fast
they unpickle.
"""

from __future__ import annotations

import argparse
import gzip
import json
import pickle
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def best_time(fn: Callable[[], Any], repeats: int, sync: Callable[[], None]) -> float:
    """Seconds of the fastest of ``repeats`` calls of ``fn`` after a warm-up (``sync`` waits for the device)."""
    fn()
    sync()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def _ops(fn: Callable[[], Any]) -> tuple[int, int]:
    from torch.profiler import profile

    with profile() as prof:
        fn()
    events = prof.events()
    top = sum(e.cpu_parent is None for e in events)
    reads = sum(e.name == "aten::_local_scalar_dense" for e in events)
    return top, reads


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=64, help="structures per batch")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    import torch
    from chgnet.model.model import BatchedGraph
    from pymatgen.core import Structure

    from cathode_ray.model.backbones.chgnet import ChgnetBackbone
    from cathode_ray.model.backbones.chgnet_graph import batch_graphs, featurize, join_graphs

    torch.set_num_threads(1)
    with gzip.open(SHARED / "mp_litmo_summary.jsonl.gz", "rt") as fh:
        docs = [json.loads(line) for _, line in zip(range(args.n), fh, strict=False)]
    bb = ChgnetBackbone(device=args.device)
    m = bb.model
    graphs = [bb.build_graph(Structure.from_dict(d["structure"])) for d in docs]
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def theirs() -> Any:  # what ChgnetBackbone did before: graphs to the device, chgnet's loop
        on_dev = [g.to(args.device) for g in graphs]
        m.composition_model(on_dev)
        return BatchedGraph.from_graphs(on_dev, bond_basis_expansion=m.bond_basis_expansion,
                                        angle_basis_expansion=m.angle_basis_expansion)

    def ours() -> Any:
        g = batch_graphs(graphs, bond_basis_expansion=m.bond_basis_expansion,
                         angle_basis_expansion=m.angle_basis_expansion,
                         n_elements=m.composition_model.max_num_elements, device=dev)
        return m.composition_model.fc(g.composition)

    host = join_graphs(graphs)
    on_dev = {k: v.to(dev) for k, v in host.items()}

    def device_part() -> Any:  # what runs on the device after batch_graphs' copies
        return featurize(on_dev, bond_basis_expansion=m.bond_basis_expansion,
                         angle_basis_expansion=m.angle_basis_expansion,
                         n_elements=m.composition_model.max_num_elements)

    with torch.inference_mode():
        rows = {name: (best_time(fn, args.repeats, sync), *_ops(fn)) for name, fn in
                (("chgnet BatchedGraph.from_graphs", theirs), ("batch_graphs", ours),
                 ("  its host part (join_graphs)", lambda: join_graphs(graphs)),
                 ("  its device part (featurize)", device_part))}
    n_atoms = sum(int(g.atomic_number.shape[0]) for g in graphs)
    print(f"{args.n} structures ({n_atoms} atoms), device {args.device}, one thread")
    for name, (t, ops, reads) in rows.items():
        print(f"  {name:32s} {t / args.n * 1e3:7.3f} ms/structure  {ops:6d} tensor ops/batch  "
              f"{reads:3d} scalar reads/batch")
    plain = [pickle.dumps(g.to("cpu"), protocol=5) for g in graphs]  # chgnet's own CrystalGraph
    packed = [pickle.dumps(g, protocol=5) for g in graphs]
    for name, blobs in (("CrystalGraph", plain), ("PackedCrystalGraph", packed)):
        t0 = time.perf_counter()
        for b in blobs:
            pickle.loads(b)
        rate = len(blobs) / (time.perf_counter() - t0)
        print(f"  pickled {name:20s} {sum(map(len, blobs)) / len(blobs) / 1024:6.1f} KiB/structure, "
              f"unpickles {rate:,.0f}/s")


if __name__ == "__main__":
    main()
