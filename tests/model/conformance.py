"""Reusable conformance check that every :class:`~cathode_ray.model.backbones.base.Backbone` passes.

Usage from a test module in this directory (pytest puts ``tests/model`` on ``sys.path``; do not
import it as ``tests.model.conformance``: the mace-torch wheel installs a top-level ``tests``
package that shadows ours)::

    from conformance import check_backbone, small_cathode_structures

    check_backbone(backbone, small_cathode_structures())

The backbone must also provide ``reference_energy(structures) -> [N] eV/atom`` (its own full
model forward) and a ``model`` attribute holding the frozen pretrained module.
"""

from __future__ import annotations

import copy
import io
from collections.abc import Sequence
from typing import Any

import torch
from pymatgen.core import Lattice, Structure

from cathode_ray.model.backbones.base import Backbone, LastBlock, TrunkFeatures
from cathode_ray.testing.compilers import cxx_compiler_available

#: Max |split - full model| energy per atom (eV/atom).
ENERGY_ATOL = 1e-4
#: Max difference of a structure's outputs alone vs inside a batch (eV/atom, embedding units).
BATCH_ATOL = 1e-5


def small_cathode_structures() -> list[Structure]:
    """Four small Li-TM-O(-P) cells (3-28 atoms): LiCoO2, Li2O, LiMn2O4 spinel, LiFePO4 olivine."""
    lco = Structure.from_spacegroup(
        "R-3m", Lattice.hexagonal(2.82, 14.05), ["Li", "Co", "O"],
        [[0, 0, 0], [0, 0, 0.5], [0, 0, 0.26]],
    ).get_primitive_structure()  # 4 atoms
    li2o = Structure.from_spacegroup(
        "Fm-3m", Lattice.cubic(4.61), ["Li", "O"], [[0.25, 0.25, 0.25], [0, 0, 0]]
    ).get_primitive_structure()  # 3 atoms
    lmo = Structure.from_spacegroup(  # pymatgen's Fd-3m is origin choice 1: Li 8a, Mn 16d, O 32e
        "Fd-3m", Lattice.cubic(8.24), ["Li", "Mn", "O"],
        [[0, 0, 0], [0.625, 0.625, 0.625], [0.388, 0.388, 0.388]],
    ).get_primitive_structure()  # 14 atoms, Li2Mn4O8
    lfp = Structure.from_spacegroup(
        "Pnma", Lattice.orthorhombic(10.33, 6.01, 4.69), ["Li", "Fe", "P", "O", "O", "O"],
        [[0, 0, 0], [0.282, 0.25, 0.975], [0.095, 0.25, 0.418], [0.097, 0.25, 0.743],
         [0.457, 0.25, 0.206], [0.165, 0.046, 0.285]],
    )  # 28 atoms
    return [lco, li2o, lmo, lfp]


def _assert_trunk_features(feats: Sequence[TrunkFeatures], n: int) -> None:
    """One dict of CPU, grad-free tensors per structure, round-tripping torch.save(weights_only)."""
    assert isinstance(feats, list) and len(feats) == n, f"trunk returned {type(feats)} of {len(feats)}"
    for f in feats:
        assert isinstance(f, dict) and f, "TrunkFeatures must be a non-empty dict"
        for key, t in f.items():
            assert isinstance(t, torch.Tensor), f"{key} is {type(t)}, not a tensor"
            assert t.device.type == "cpu", f"{key} is on {t.device}"
            assert not t.requires_grad, f"{key} requires grad (trunk must be frozen)"
    buf = io.BytesIO()
    torch.save(feats[0], buf)
    buf.seek(0)
    back = torch.load(buf, weights_only=True)
    assert back.keys() == feats[0].keys()


def _run(backbone: Backbone, last: LastBlock, feats: Sequence[TrunkFeatures]) -> tuple[torch.Tensor, torch.Tensor]:
    """Collate on the backbone's device and run the last block (no grad)."""
    device = getattr(backbone, "device", "cpu")
    with torch.no_grad():
        e_pa, emb = last(backbone.collate(feats, device))
    return e_pa.detach().cpu(), emb.detach().cpu()


def _assert_batch_independent(
    backbone: Backbone, last: LastBlock, graphs: Sequence[Any], feats: Sequence[TrunkFeatures],
    e_pa: torch.Tensor, emb: torch.Tensor,
) -> float:
    """Each structure alone (own trunk call) and in reversed batch order gives the same outputs."""
    worst = 0.0
    for i, g in enumerate(graphs):
        e1, m1 = _run(backbone, last, backbone.trunk([g]))
        worst = max(worst, float((e1[0] - e_pa[i]).abs()), float((m1[0] - emb[i]).abs().max()))
    e_rev, m_rev = _run(backbone, last, list(reversed(feats)))
    worst = max(worst, float((e_rev.flip(0) - e_pa).abs().max()), float((m_rev.flip(0) - emb).abs().max()))
    assert worst < BATCH_ATOL, f"outputs depend on batch composition: max diff {worst:.3g}"
    return worst


def _assert_grad_split(backbone: Backbone, last: LastBlock, batch: dict[str, torch.Tensor]) -> None:
    """Trunk frozen, last block trainable, and gradients reach every last-block parameter."""
    trunk_params = list(backbone.model.parameters())  # type: ignore[attr-defined]
    assert trunk_params and not any(p.requires_grad for p in trunk_params), "trunk has trainable params"
    params = list(last.parameters())
    assert params and all(p.requires_grad for p in params), "last block has frozen parameters"
    last.zero_grad(set_to_none=True)
    e_pa, emb = last(batch)
    (e_pa.sum() + emb.pow(2).mean()).backward()
    missing = [n for n, p in last.named_parameters() if p.grad is None]
    assert not missing, f"no gradient reached {missing[:5]}"
    total = sum(float(p.grad.abs().sum()) for p in params)
    assert total > 0.0, "all last-block gradients are zero"
    assert all(p.grad is None for p in trunk_params), "gradient leaked into the trunk"


def _assert_fresh_copy(backbone: Backbone, last: LastBlock, feats: Sequence[TrunkFeatures], e_pa: torch.Tensor) -> None:
    """Training one last block must not change the pretrained weights / other copies."""
    with torch.no_grad():
        for p in last.parameters():
            p.add_(0.01)
    e_fresh, _ = _run(backbone, backbone.new_last_block(), feats)
    assert torch.allclose(e_fresh, e_pa, atol=BATCH_ATOL), "new_last_block shares weights with a trained copy"


def _assert_trunk_batch_equals_collate(backbone: Backbone, graphs: Sequence[Any],
                                       batch: dict[str, torch.Tensor], device: Any) -> None:
    """The device-resident inference path (``trunk_batch``) gives the batch ``collate`` builds
    from cached features: the same keys, dtypes, shapes and values (extra keys may carry what the
    trunk already computed), and the same last-block outputs."""
    direct = backbone.trunk_batch(graphs, device)
    assert batch.keys() <= direct.keys(), f"keys missing: {sorted(set(batch) - set(direct))}"
    for k, v in batch.items():
        d = direct[k]
        assert d.dtype == v.dtype and d.shape == v.shape, f"{k}: {d.dtype}{tuple(d.shape)} vs {v.dtype}{tuple(v.shape)}"
        assert d.device.type == torch.device(device).type, f"{k} left the device: {d.device}"
        assert torch.equal(d, v) if not v.is_floating_point() else torch.allclose(d, v, atol=1e-6), \
            f"{k}: trunk_batch differs from collate(trunk)"
    last = backbone.new_last_block()
    with torch.no_grad():
        (e1, m1), (e2, m2) = last(direct), last(batch)
    assert torch.allclose(e1, e2, atol=BATCH_ATOL) and torch.allclose(m1, m2, atol=BATCH_ATOL), \
        "the last block gives other outputs on trunk_batch than on collate(trunk)"


def _assert_compile_template(backbone: Backbone, last: LastBlock, batch: dict[str, torch.Tensor]) -> None:
    """``compile_template`` called with another (perturbed) last block's weights computes what
    that block does (compiled members pass each member's weights to one template), or raises
    NotImplementedError (the ensemble then runs the members uncompiled)."""
    try:
        template = backbone.compile_template(last)
    except NotImplementedError:
        return
    other = backbone.new_last_block().eval()
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.01)
    state = {**dict(other.named_parameters())}
    with torch.no_grad():
        (e1, m1), (e2, m2) = torch.func.functional_call(template, state, (batch,)), other(batch)
    assert torch.allclose(e1, e2, atol=BATCH_ATOL) and torch.allclose(m1, m2, atol=BATCH_ATOL), \
        "compile_template with a member's weights differs from the member's last block"


def _assert_compile_trunk(backbone: Backbone, graphs: Sequence[Any], device: Any) -> None:
    """``compile_trunk``'s function equals ``trunk_batch`` (every key, two batch sizes: one compiled
    graph with dynamic shapes serves both), or raises NotImplementedError (the ensemble then
    runs the trunk uncompiled). Skipped without a C++ compiler (TorchInductor needs one on CPU)."""
    if str(device).startswith("cpu") and not cxx_compiler_available():
        return
    try:
        compiled = backbone.compile_trunk()
    except NotImplementedError:
        return
    for part in (graphs, graphs[1:]):
        got, want = compiled(part, device), backbone.trunk_batch(part, device)
        assert got.keys() == want.keys(), f"compiled trunk keys {sorted(got)} != {sorted(want)}"
        for key, value in want.items():
            assert got[key].dtype == value.dtype and got[key].shape == value.shape, key
            assert torch.allclose(got[key], value, atol=BATCH_ATOL), f"compiled trunk differs in {key}"


def check_backbone(backbone: Backbone, structures: Sequence[Structure]) -> dict[str, float]:
    """Assert the Backbone contract on ``structures`` (>= 2); returns the measured errors.

    Checks: graphs build; trunk gives one CPU TrunkFeatures per structure (saveable with
    ``weights_only=True``); ``trunk_batch`` equals ``collate(trunk)``; collate + new_last_block give finite e_pa [B] (eV/atom) and embedding
    [B, embedding_dim]; trunk_embedding is finite [B, D']; the split reproduces
    ``backbone.reference_energy`` within :data:`ENERGY_ATOL`; outputs do not depend on batch
    composition (:data:`BATCH_ATOL`); trunk frozen, last block trainable with gradients; the
    last block is a copy; ``compile_template`` with a block's weights computes what the block does;
    ``compile_trunk`` computes what ``trunk_batch`` does.
    """
    n = len(structures)
    assert n >= 2, "need at least two structures to test batching"
    for attr in ("name", "weights_sha256", "cutoff", "embedding_dim", "trunk_embedding_dim",
                 "energy_is_mp2020_corrected"):
        assert hasattr(backbone, attr), f"backbone lacks {attr}"
    assert len(backbone.weights_sha256) == 64 and backbone.cutoff > 0

    graphs = [backbone.build_graph(s) for s in structures]
    feats = backbone.trunk(graphs)
    _assert_trunk_features(feats, n)

    device = getattr(backbone, "device", "cpu")
    batch = backbone.collate(feats, device)
    assert batch["n_atoms"].tolist() == [len(s) for s in structures]
    _assert_trunk_batch_equals_collate(backbone, graphs, batch, device)
    _assert_compile_template(backbone, backbone.new_last_block(), backbone.trunk_batch(graphs, device))
    _assert_compile_trunk(backbone, graphs, device)
    last = backbone.new_last_block()
    e_pa, emb = _run(backbone, last, feats)
    assert e_pa.shape == (n,) and torch.isfinite(e_pa).all(), f"bad e_pa {e_pa}"
    assert emb.shape == (n, backbone.embedding_dim) and torch.isfinite(emb).all(), f"bad embedding {emb.shape}"
    trunk_emb = backbone.trunk_embedding(batch)
    assert trunk_emb.shape == (n, backbone.trunk_embedding_dim) and torch.isfinite(trunk_emb).all()

    ref = backbone.reference_energy(structures).double().cpu()  # type: ignore[attr-defined]
    energy_err = float((e_pa.double() - ref).abs().max())
    assert energy_err < ENERGY_ATOL, f"split != full model: {e_pa.tolist()} vs {ref.tolist()}"

    batch_err = _assert_batch_independent(backbone, last, graphs, feats, e_pa, emb)
    _assert_grad_split(backbone, copy.deepcopy(last), batch)
    _assert_fresh_copy(backbone, last, feats, e_pa)
    return {"energy_err": energy_err, "batch_err": batch_err}
