"""One member's loop on real CHGNet trunk features: what trains, what stays frozen, resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cathode_ray.model.member import Member, Normalizer
from cathode_ray.train.features import subset
from cathode_ray.train.loop import TrainConfig, fit_member, pinball, predict_member, spearman
from tests.chgnet_data import chgnet, layered_cells, member_data


@pytest.fixture(scope="module")
def data():
    d = member_data(16, seed=1)
    return subset(d, np.arange(12)), subset(d, np.arange(12, 16))


def test_pinball_matches_hand_values() -> None:
    y = torch.tensor([1.0, 2.0])
    pred = torch.tensor([1.5, 1.5])
    # q=0.9: under-prediction costs 0.9/unit, over-prediction 0.1/unit -> (0.05 + 0.45) / 2
    assert pinball(pred, y, 0.9).item() == pytest.approx(0.25)
    assert spearman(np.array([1, 2, 3.0]), np.array([3, 2, 1.0])) == pytest.approx(-1.0)


def test_config_validates() -> None:
    with pytest.raises(ValueError):
        TrainConfig(micro_batch=0)
    with pytest.raises(TypeError):
        TrainConfig(42)  # type: ignore[misc]


def test_frozen_trunk_unchanged_last_block_changes(data) -> None:
    bb = chgnet()
    train, val = data
    before = {k: v.clone() for k, v in bb.model.state_dict().items()}
    fresh = bb.new_last_block().state_dict()
    cfg = TrainConfig(seed=42, max_epochs=3, patience=3, lr_backbone=1e-3, micro_batch=4, grad_accum=1)
    res = fit_member(bb, train, val, cfg, normalizer=Normalizer.fit(train.y))
    after = bb.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # bitwise: backbone untouched
    trained = {k.removeprefix("last_block."): v for k, v in res.member_state.items() if k.startswith("last_block.")}
    assert any(not torch.equal(fresh[k], trained[k]) for k in fresh)  # the last block moved
    assert res.epochs_run == 3 and len(res.history) == 3 and np.isfinite(res.val_mae)


def test_head_only_mode_keeps_pretrained_block(data) -> None:
    bb = chgnet()
    train, val = data
    fresh = bb.new_last_block().state_dict()
    cfg = TrainConfig(seed=43, max_epochs=2, patience=2, train_last_block=False, micro_batch=4)
    res = fit_member(bb, train, val, cfg, normalizer=Normalizer.fit(train.y))
    for k, v in fresh.items():
        assert torch.equal(res.member_state[f"last_block.{k}"], v)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_head_only_member_trains_on_a_gpu(data) -> None:
    """Validation fed the head the cached CPU inputs while its weights were on the GPU."""
    bb = chgnet()
    train, val = data
    cfg = TrainConfig(seed=43, max_epochs=2, patience=2, train_last_block=False, micro_batch=4,
                      device="cuda")
    res = fit_member(bb, train, val, cfg, normalizer=Normalizer.fit(train.y))
    assert res.epochs_run == 2 and np.isfinite(res.val_mae)


def test_cached_trunk_equals_direct_forward(data) -> None:
    """Predictions from cached features equal a fresh trunk pass over the same structures."""
    bb = chgnet()
    train, _ = data
    member = Member.create(bb, TrainConfig().head, Normalizer.fit(train.y)).eval()
    cached = predict_member(member, bb, train)
    structures = layered_cells(16, seed=1)[:12]
    direct_feats = bb.trunk([bb.build_graph(s) for s in structures])
    direct = predict_member(member, bb, subset(train, np.arange(12)).__class__(
        feats=direct_feats, y=train.y, hull_pa=train.hull_pa, corr_pa=train.corr_pa, has_ref=train.has_ref))
    np.testing.assert_allclose(cached["q50"], direct["q50"], atol=1e-6)


def test_resume_replays_the_same_run(data) -> None:
    """A run resumed from its epoch-1 checkpoint ends where an uninterrupted run ends."""
    bb = chgnet()
    train, val = data
    norm = Normalizer.fit(train.y)
    cfg = TrainConfig(seed=44, max_epochs=3, patience=5, micro_batch=4, grad_accum=2)
    states = []
    full = fit_member(bb, train, val, cfg, normalizer=norm, on_epoch=lambda r: states.append(r.state))
    resumed = fit_member(bb, train, val, cfg, normalizer=norm, resume=states[1])
    assert [h["epoch"] for h in resumed.history] == [0, 1, 2]
    for k, v in full.member_state.items():
        torch.testing.assert_close(resumed.member_state[k], v)


def test_different_seeds_give_different_members(data) -> None:
    bb = chgnet()
    train, val = data
    norm = Normalizer.fit(train.y)
    a = fit_member(bb, train, val, TrainConfig(seed=42, max_epochs=1, micro_batch=4), normalizer=norm)
    b = fit_member(bb, train, val, TrainConfig(seed=43, max_epochs=1, micro_batch=4), normalizer=norm)
    assert not torch.equal(a.member_state["head.out.weight"], b.member_state["head.out.weight"])


def test_small_mace_member_trains_end_to_end(tmp_path) -> None:
    """mace:PATH (a tiny MACE built with mace.modules) trains a last-block member for real."""
    from cathode_ray.model.backbones import load_backbone
    from cathode_ray.testing.tiny_mace import build_tiny_mace
    from cathode_ray.train.features import member_data as make_data

    bb = load_backbone(f"mace:{build_tiny_mace(tmp_path / 'tiny.model')}")
    structures = layered_cells(12, seed=5)
    feats = bb.trunk([bb.build_graph(s) for s in structures])
    y = np.linspace(0.0, 0.15, 12)
    data = make_data(feats, y, np.zeros(12), np.zeros(12), np.zeros(12, dtype=bool))  # no hull: embedding path
    train, val = subset(data, np.arange(9)), subset(data, np.arange(9, 12))
    fresh = bb.new_last_block().state_dict()
    res = fit_member(bb, train, val, TrainConfig(seed=42, max_epochs=2, micro_batch=4, lr_backbone=1e-3),
                     normalizer=Normalizer.fit(train.y))
    assert res.epochs_run == 2 and np.isfinite(res.val_mae)
    moved = [k for k in fresh if not torch.equal(fresh[k], res.member_state[f"last_block.{k}"])]
    assert moved  # the MACE last interaction trained
