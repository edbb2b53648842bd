"""Small real CHGNet trunk features for model/train tests (strained layered LiMO2 cells)."""

from __future__ import annotations

import functools

import numpy as np
import torch
from pymatgen.core import Lattice, Structure

from cathode_ray.model.backbones import load_backbone
from cathode_ray.model.backbones.chgnet import ChgnetBackbone
from cathode_ray.train.loop import MemberData

_CELLS = (("Co", 2.82, 14.05, 0.24), ("Ni", 2.88, 14.19, 0.24), ("Mn", 2.90, 14.30, 0.25),
          ("Fe", 2.95, 14.50, 0.25))


@functools.lru_cache(maxsize=1)
def chgnet() -> ChgnetBackbone:
    bb = load_backbone("chgnet")
    assert isinstance(bb, ChgnetBackbone)
    return bb


def layered_cells(n: int, seed: int = 0) -> list[Structure]:
    """n primitive R-3m LiMO2 cells (4 atoms) with random +-3 % strain."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        m, a, c, zo = _CELLS[k % len(_CELLS)]
        s = Structure.from_spacegroup("R-3m", Lattice.hexagonal(a, c), ["Li", m, "O"],
                                      [[0, 0, 0.5], [0, 0, 0], [0, 0, zo]]).get_primitive_structure()
        s.apply_strain(rng.uniform(-0.03, 0.03, 3).tolist())
        out.append(s)
    return out


def member_data(n: int, seed: int = 0) -> MemberData:
    """Trunk features + labels whose zero-shot part is CHGNet's energy minus a fake hull."""
    bb = chgnet()
    feats = bb.trunk([bb.build_graph(s) for s in layered_cells(n, seed)])
    with torch.no_grad():
        e_pa, _ = bb.new_last_block()(bb.collate(feats))
    g = torch.Generator().manual_seed(seed)
    y = (0.02 + 0.1 * torch.rand(n, generator=g)).float()
    return MemberData(feats=feats, y=y, hull_pa=(e_pa - y + 0.01).float(), corr_pa=torch.zeros(n),
                      has_ref=torch.ones(n, dtype=torch.bool))
