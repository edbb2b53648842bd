"""Fixtures shared by the model tests."""

from __future__ import annotations

import pytest

from cathode_ray.model.backbones.mace import MaceBackbone
from cathode_ray.testing.tiny_mace import build_tiny_mace


@pytest.fixture(scope="module")
def tiny_mace(tmp_path_factory: pytest.TempPathFactory) -> MaceBackbone:
    """A tiny ScaleShiftMACE backbone (r_max 4 A), built once per test module."""
    path = build_tiny_mace(tmp_path_factory.mktemp("mace") / "tiny.model", r_max=4.0, seed=0)
    return MaceBackbone.from_spec(f"mace:{path}")
