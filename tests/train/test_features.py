"""The on-disk trunk-feature cache: hits give the stored features, a new trunk revision recomputes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from pymatgen.core import Structure

from cathode_ray.train.features import cached_trunk_features
from tests.chgnet_data import chgnet, layered_cells


def test_cache_hits_and_a_new_trunk_revision_recomputes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bb = chgnet()
    structures, ids = layered_cells(2), ["a", "b"]
    first = cached_trunk_features(bb, structures, ids, tmp_path)
    (path,) = tmp_path.glob("trunk-chgnet-0.3.0-*.pt")
    stored = torch.load(path, weights_only=True)
    stored[0]["atom_feas"] += 1.0  # mark the stored copy: a hit must return it
    torch.save(stored, path)
    hit = cached_trunk_features(bb, structures, ids, tmp_path)
    assert torch.equal(hit[0]["atom_feas"], first[0]["atom_feas"] + 1.0)
    assert len(cached_trunk_features(bb, structures, ["a", "c"], tmp_path)) == 2  # other ids: a new entry
    assert len(list(tmp_path.glob("*.pt"))) == 2
    monkeypatch.setattr(type(bb), "trunk_revision", bb.trunk_revision + 1)
    recomputed = cached_trunk_features(bb, structures, ids, tmp_path)
    assert torch.equal(recomputed[0]["atom_feas"], first[0]["atom_feas"])  # not the marked copy
    assert len(list(tmp_path.glob("*.pt"))) == 3


def test_a_structure_corrected_under_its_id_is_not_served_the_old_features(tmp_path: Path) -> None:
    """The key held ids and Cartesian coordinates only: a new element or a new cell at the same
    coordinates (an MP correction that keeps the material id) got the old structure's features."""
    bb = chgnet()
    (s,) = layered_cells(1)
    first = cached_trunk_features(bb, [s], ["mp-1"], tmp_path)
    swapped = s.copy()
    swapped.replace_species({"Co": "Ni"})
    strained = Structure(s.lattice.matrix * 1.02, s.species, s.cart_coords,
                         coords_are_cartesian=True)  # Cartesian coordinates kept
    assert np.allclose(strained.cart_coords, s.cart_coords)
    for changed in (swapped, strained):
        feats = cached_trunk_features(bb, [changed], ["mp-1"], tmp_path)
        assert not torch.equal(feats[0]["atom_feas"], first[0]["atom_feas"])
    assert len(list(tmp_path.glob("*.pt"))) == 3
