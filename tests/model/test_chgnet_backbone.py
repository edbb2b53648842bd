"""ChgnetBackbone (weights from the chgnet wheel) passes the shared backbone conformance check."""

from __future__ import annotations

import pytest
from conformance import check_backbone, small_cathode_structures

from cathode_ray.model.backbones import load_backbone
from cathode_ray.model.backbones.chgnet import ChgnetBackbone


@pytest.fixture(scope="module")
def chgnet() -> ChgnetBackbone:
    bb = load_backbone("chgnet")
    assert isinstance(bb, ChgnetBackbone)
    return bb


def test_conformance(chgnet: ChgnetBackbone) -> None:
    errs = check_backbone(chgnet, small_cathode_structures())
    assert errs["energy_err"] < 1e-4


def test_identity(chgnet: ChgnetBackbone) -> None:
    assert chgnet.name == "chgnet-0.3.0"
    assert chgnet.energy_is_mp2020_corrected is True
    assert chgnet.cutoff == pytest.approx(6.0)  # Angstrom (atom graph)
    assert chgnet.embedding_dim == 64
