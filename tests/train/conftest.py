"""Fixtures for the Ray ensemble tests: tiny real CHGNet trunk features and a small local Ray."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from cathode_ray.model.member import Normalizer
from cathode_ray.train.loop import MemberData

#: (space group, species, fractional coords, lattice builder args) of small cathode-like cells.
_PROTOTYPES: tuple[tuple[str, str, tuple[float, float], list[str], list[list[float]]], ...] = (
    ("LiCoO2", "R-3m", (2.82, 14.05), ["Li", "Co", "O"], [[0, 0, 0.5], [0, 0, 0], [0, 0, 0.24]]),
    ("LiNiO2", "R-3m", (2.88, 14.19), ["Li", "Ni", "O"], [[0, 0, 0.5], [0, 0, 0], [0, 0, 0.24]]),
    ("LiMnO2", "R-3m", (2.90, 14.30), ["Li", "Mn", "O"], [[0, 0, 0.5], [0, 0, 0], [0, 0, 0.25]]),
    ("LiFeO2", "R-3m", (2.95, 14.50), ["Li", "Fe", "O"], [[0, 0, 0.5], [0, 0, 0], [0, 0, 0.25]]),
)


@dataclass(frozen=True, kw_only=True)
class TinyData:
    """Cached CHGNet trunk features of a few strained layered oxides with made-up labels."""

    train: MemberData
    val: MemberData
    normalizer: Normalizer


def tiny_structures(n: int, seed: int) -> list:
    """n small (4-atom primitive) LiMO2 cells with random +-3% strain."""
    from pymatgen.core import Lattice, Structure

    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        _, sg, (a, c), species, coords = _PROTOTYPES[k % len(_PROTOTYPES)]
        s = Structure.from_spacegroup(sg, Lattice.hexagonal(a, c), species, coords)
        s = s.get_primitive_structure()
        s.apply_strain(rng.uniform(-0.03, 0.03, 3).tolist())
        out.append(s)
    return out


def member_data(structures: list, y: torch.Tensor) -> MemberData:
    """MemberData with hull_pa = CHGNet's own energy minus y, so the zero-shot E_hull is exact."""
    from cathode_ray.model.backbones import load_backbone

    bb = load_backbone("chgnet")
    feats = bb.trunk([bb.build_graph(s) for s in structures])
    with torch.no_grad():
        e_pa, _ = bb.new_last_block()(bb.collate(feats))
    n = len(structures)
    return MemberData(feats=feats, y=y.float(), hull_pa=(e_pa.float() - y.float()),
                      corr_pa=torch.zeros(n), has_ref=torch.ones(n, dtype=torch.bool))


@pytest.fixture(scope="session")
def tiny_data() -> TinyData:
    """24 train / 8 val structures (made-up E_hull labels in 0..0.3 eV/atom)."""
    structures = tiny_structures(32, seed=0)
    gen = torch.Generator().manual_seed(0)
    y = torch.rand(32, generator=gen) * 0.3
    data = member_data(structures, y)
    idx_tr, idx_va = list(range(24)), list(range(24, 32))

    def take(idx: list[int]) -> MemberData:
        i = torch.tensor(idx)
        return MemberData(feats=[data.feats[j] for j in idx], y=data.y[i], hull_pa=data.hull_pa[i],
                          corr_pa=data.corr_pa[i], has_ref=data.has_ref[i])

    train = take(idx_tr)
    return TinyData(train=train, val=take(idx_va), normalizer=Normalizer.fit(train.y))


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    """A private 2-CPU local Ray instance for the module (shut down afterwards).

    Test-speed knobs of Ray Train V2 (read by the driver and propagated to the controllers): no
    preemption-watcher actor per run, no Train metrics callbacks, 0.5 s worker health checks so a
    killed worker is noticed quickly.
    """
    import ray

    if ray.is_initialized():
        ray.shutdown()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        mp.setenv("RAY_TRAIN_METRICS_ENABLED", "0")
        mp.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            yield None
        finally:
            ray.shutdown()
