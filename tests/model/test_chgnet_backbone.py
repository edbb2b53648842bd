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


def test_last_conv_equals_chgnet_atom_conv_in_float32(chgnet: ChgnetBackbone) -> None:
    """The last block's convolution (float32 sums under bf16) is chgnet's AtomConv in float32."""
    import torch

    from cathode_ray.model.backbones.chgnet import _atom_conv

    batch = chgnet.trunk_batch([chgnet.build_graph(s) for s in small_cathode_structures()[:2]])
    block = chgnet.new_last_block()
    kwargs = {k: batch[k] for k in ("atom_feas", "bond_feas", "bond_weights", "directed2undirected")}
    kwargs["atom_graph"] = batch["atom_graph"]
    with torch.no_grad():
        ours = _atom_conv(block.atom_conv, **kwargs)
        theirs = block.atom_conv(**kwargs)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = _atom_conv(block.atom_conv, **kwargs)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert low.dtype == torch.float32  # sums and the residual stay float32 under bf16
    assert 0 < float((low - ours).abs().max()) < 0.1
