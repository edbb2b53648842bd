"""Turn a dataset into member training data: frozen-trunk features once, plus hull inputs.

The trunk runs once per structure for the whole dataset (every member and every epoch reuses
it). Hull inputs per structure, in eV/atom:

- ``hull_pa``: reference-hull energy at the structure's composition. For labelled materials the
  material itself is left out of the hull (``leave_self_out``), so a training material looks
  like a new candidate would at screening time.
- ``corr_pa``: MP2020 correction for backbones that predict uncorrected energies (MACE-MP-0);
  0 for CHGNet.
- ``has_ref``: False where the chemical system has no references (embedding-only path).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from pymatgen.core import Structure

from cathode_ray.data.references import NoReferenceError, ReferenceHull, mp2020_correction_per_atom
from cathode_ray.model.backbones import Backbone, TrunkFeatures

from .loop import MemberData

log = logging.getLogger(__name__)


def trunk_features(backbone: Backbone, structures: Sequence[Structure], *, batch: int = 16,
                   device: str = "cpu") -> list[TrunkFeatures]:
    """Frozen-trunk features for every structure (graphs built with the backbone's own code)."""
    feats: list[TrunkFeatures] = []
    for start in range(0, len(structures), batch):
        graphs = [backbone.build_graph(s) for s in structures[start:start + batch]]
        feats.extend(backbone.trunk(graphs, device=device))
    return feats


def cached_trunk_features(backbone: Backbone, structures: Sequence[Structure], ids: Sequence[str],
                          cache_dir: str | Path | None, **kw: object) -> list[TrunkFeatures]:
    """:func:`trunk_features` with an on-disk cache keyed by the backbone (name, weights sha256,
    trunk revision, cutoff) and each structure's id, species, lattice and coordinates: a
    corrected structure that keeps its MP id is not served the old one's features."""
    if cache_dir is None:
        return trunk_features(backbone, structures, **kw)  # type: ignore[arg-type]
    h = hashlib.sha256(f"{backbone.name}:{backbone.weights_sha256}:r{backbone.trunk_revision}:"
                       f"{backbone.cutoff!r}".encode())
    for sid, s in zip(ids, structures, strict=True):
        h.update(sid.encode() + b"\0")
        h.update(np.asarray(s.atomic_numbers, dtype=np.int64).tobytes())
        h.update(np.asarray(s.lattice.matrix, dtype=np.float64).tobytes())
        h.update(np.asarray(s.lattice.pbc, dtype=bool).tobytes())
        h.update(np.asarray(s.cart_coords, dtype=np.float64).tobytes())
    path = Path(cache_dir) / f"trunk-{backbone.name.replace(':', '_').replace('/', '_')}-{h.hexdigest()[:16]}.pt"
    if path.exists():
        log.info("trunk features from cache %s", path)
        return torch.load(path, map_location="cpu", weights_only=True)
    feats = trunk_features(backbone, structures, **kw)  # type: ignore[arg-type]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(feats, tmp)
    tmp.replace(path)
    return feats


def hull_inputs(structures: Sequence[Structure], backbone: Backbone, hull: ReferenceHull, *,
                exclude_ids: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(hull_pa [N], corr_pa [N], has_ref [N]) in eV/atom for each structure.

    ``exclude_ids[i]`` (a material id) is left out of structure i's hull (leave-self-out).
    """
    n = len(structures)
    hull_pa = np.zeros(n)
    corr_pa = np.zeros(n)
    has_ref = np.zeros(n, dtype=bool)
    for i, s in enumerate(structures):
        excl = (exclude_ids[i],) if exclude_ids is not None else ()
        try:
            hull_pa[i] = hull.hull_energy_per_atom(s.composition, exclude_ids=excl)
            has_ref[i] = True
        except NoReferenceError:
            has_ref[i] = False
        if not backbone.energy_is_mp2020_corrected:
            try:
                corr_pa[i] = mp2020_correction_per_atom(s)
            except ValueError as e:  # compatibility refuses the structure: no zero-shot path
                log.warning("no MP2020 correction for structure %d (%s): %s", i, s.formula, e)
                has_ref[i] = False
    return hull_pa, corr_pa, has_ref


def member_data(feats: Sequence[TrunkFeatures], y: np.ndarray, hull_pa: np.ndarray,
                corr_pa: np.ndarray, has_ref: np.ndarray) -> MemberData:
    """Bundle features and arrays into :class:`MemberData` (float32 tensors)."""
    return MemberData(
        feats=list(feats),
        y=torch.as_tensor(np.asarray(y, dtype=np.float32)),
        hull_pa=torch.as_tensor(np.asarray(hull_pa, dtype=np.float32)),
        corr_pa=torch.as_tensor(np.asarray(corr_pa, dtype=np.float32)),
        has_ref=torch.as_tensor(np.asarray(has_ref, dtype=bool)),
    )


def subset(data: MemberData, idx: np.ndarray) -> MemberData:
    """Rows ``idx`` of ``data``."""
    i = torch.as_tensor(idx, dtype=torch.long)
    return MemberData(feats=[data.feats[k] for k in idx], y=data.y[i], hull_pa=data.hull_pa[i],
                      corr_pa=data.corr_pa[i], has_ref=data.has_ref[i])
