"""Stacked members (one vmap call) equal members run one by one; precision modes and their bound."""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conformance import small_cathode_structures
from ensembles import perturbed_ensemble, thermo

from cathode_ray import seedcard
from cathode_ray.model.backbones import Backbone
from cathode_ray.model.backbones.mace import MaceBackbone
from cathode_ray.model.ensemble import Ensemble
from cathode_ray.model.member import Normalizer, ThermoInputs
from cathode_ray.model.stacked import check_precision, precision_context
from cathode_ray.testing.tf32 import emulated_tf32
from cathode_ray.testing.tiny_mace import build_tiny_mace
from tests.chgnet_data import chgnet, member_data


def _ensemble(bb: Backbone, n_members: int = 3, *, head_only: bool = False) -> Ensemble:
    return perturbed_ensemble(bb, n_members, head_only=head_only, stack_members=True)


def _stacked_vs_loop(ens: Ensemble, feats: list, th: ThermoInputs) -> tuple:
    stacked = ens.predict_feats(feats, th)
    assert ens.stack_members, "stacking fell back to the loop"
    ens.stack_members = False
    loop = ens.predict_feats(feats, th)
    return stacked, loop


def test_stacked_chgnet_members_equal_loop() -> None:
    ens = _ensemble(chgnet())
    data = member_data(6, seed=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stacked, loop = _stacked_vs_loop(ens, data.feats, thermo(6))
    slow = [str(w.message) for w in caught if "batching rule" in str(w.message)]
    assert not slow, slow  # every op of the last block has a vmap batching rule (no per-member loop)
    assert stacked.q50.shape == (3, 6)
    assert np.abs(loop.q50[0] - loop.q50[1]).max() > 1e-4  # members really differ
    for k in ("q10", "q50", "q90", "p_stable", "p_metastable"):
        np.testing.assert_allclose(getattr(stacked, k), getattr(loop, k), atol=1e-5)
    np.testing.assert_allclose(stacked.zero_shot_ehull, loop.zero_shot_ehull, atol=1e-5, equal_nan=True)


def test_stacked_mace_members_equal_loop_and_restore_mace(tiny_mace: MaceBackbone) -> None:
    import mace.modules.blocks as blocks

    original = blocks.scatter_sum
    structures = small_cathode_structures()
    feats = tiny_mace.trunk([tiny_mace.build_graph(s) for s in structures])
    ens = _ensemble(tiny_mace)
    stacked, loop = _stacked_vs_loop(ens, feats, thermo(len(structures)))
    assert np.abs(loop.q50[0] - loop.q50[2]).max() > 1e-4
    np.testing.assert_allclose(stacked.q50, loop.q50, atol=1e-5)
    np.testing.assert_allclose(stacked.p_stable, loop.p_stable, atol=1e-5)
    assert blocks.scatter_sum is original  # the vmap-safe swap is undone


def test_stacked_mace_members_run_with_torchscript_fusion_enabled(tmp_path: Path) -> None:
    """With TorchScript's fuser on (CUDA's default; forced here on the CPU), e3nn's scripted code
    gets fused after a profiling call, and fused kernels cannot be vmapped: without the MACE
    context's ``no_jit_fusion`` the second stacked call fails. With it, every call stays stacked,
    and the fuser flags come back afterwards."""
    bb = MaceBackbone.from_spec(f"mace:{build_tiny_mace(tmp_path / 'fresh.model', r_max=4.0, seed=3)}")
    structures = small_cathode_structures()[:3]
    with torch.inference_mode():
        batch = bb.trunk_batch([bb.build_graph(s) for s in structures])  # before fusion is forced
    ens = _ensemble(bb, 3)
    cpu, texpr = torch._C._jit_can_fuse_on_cpu(), torch._C._jit_texpr_fuser_enabled()
    torch._C._jit_override_can_fuse_on_cpu(True)
    torch._C._jit_set_texpr_fuser_enabled(True)
    try:
        with torch.inference_mode():
            outs = [ens.member_outputs(batch, thermo(3)) for _ in range(4)]
        assert ens.stack_members, "stacking fell back to the loop"
        assert torch._C._jit_can_fuse_on_cpu() and torch._C._jit_texpr_fuser_enabled()  # restored
    finally:
        torch._C._jit_override_can_fuse_on_cpu(cpu)
        torch._C._jit_set_texpr_fuser_enabled(texpr)
    torch.testing.assert_close(outs[-1]["q50"], outs[0]["q50"])


def test_falls_back_to_loop_when_ops_cannot_be_vmapped(tiny_mace: MaceBackbone,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the MACE context, mace's in-place scatter fails under vmap: the loop takes over."""
    structures = small_cathode_structures()[:2]
    feats = tiny_mace.trunk([tiny_mace.build_graph(s) for s in structures])
    ens = _ensemble(tiny_mace, 2)
    monkeypatch.setattr(tiny_mace, "vmap_context", contextlib.nullcontext)
    pred = ens.predict_feats(feats, thermo(2))
    assert ens.stack_members is False
    ref = ens.predict_feats(feats, thermo(2))
    np.testing.assert_allclose(pred.q50, ref.q50, atol=1e-6)


def test_precision_context_validates_and_restores_flags() -> None:
    with pytest.raises(ValueError, match="float32, tf32, bf16"):
        check_precision("fp8")
    before = torch.backends.cuda.matmul.allow_tf32
    with precision_context("tf32", "cpu"):
        assert torch.backends.cuda.matmul.allow_tf32 is True
    assert torch.backends.cuda.matmul.allow_tf32 is before
    with precision_context("bf16", "cpu"):
        y = torch.nn.functional.linear(torch.randn(2, 4), torch.randn(3, 4))
    assert y.dtype == torch.bfloat16
    with precision_context("float32", "cpu"):
        assert torch.nn.functional.linear(torch.randn(2, 4), torch.randn(3, 4)).dtype == torch.float32


@pytest.mark.parametrize("head_only", [False, True])
def test_precision_deviation_chgnet(head_only: bool) -> None:
    """float32 is exact; bf16 moves predictions a little (readout stays float32) and is measured."""
    ens = _ensemble(chgnet(), 2, head_only=head_only)
    data = member_data(6, seed=2)
    th = thermo(6)
    batch = chgnet().collate(data.feats)
    assert ens.precision_deviation(batch, th, precision="float32") == 0.0
    dev = ens.precision_deviation(batch, th, precision="bf16")
    assert 0.0 < dev < 0.05  # eV/atom: bf16 perturbs, but the float32 readout keeps it small
    out = ens.member_outputs(batch, th, "bf16")
    assert out["energy_pa"].dtype == torch.float32 and out["q50"].dtype == torch.float32


@pytest.mark.parametrize("mode", ["round", "truncate"])
def test_chgnet_tf32_is_within_the_seedcard_bound(mode: str) -> None:
    """TF32 (emulated on the CPU) moves CHGNet members' predictions, but by less than the bound the
    screen enforces: the readout and the convolution's sums stay strict float32."""
    ens = _ensemble(chgnet(), 2)
    data = member_data(6, seed=2)
    batch, th = chgnet().collate(data.feats), thermo(6)
    with emulated_tf32(mode):
        dev = ens.precision_deviation(batch, th, precision="tf32")
    assert 0.0 < dev < seedcard.PRECISION_MAX_DEVIATION


def test_mace_bf16_casts_the_last_block_and_keeps_float32_weights(tiny_mace: MaceBackbone) -> None:
    """e3nn cannot run under bf16 autocast, so MACE's last block runs on a bfloat16 cast of its
    weights: a small, measured deviation, the same stacked or looped, float32 outputs, and the
    member's own weights untouched (they are trained and saved in float32)."""
    structures = small_cathode_structures()[:3]
    feats = tiny_mace.trunk([tiny_mace.build_graph(s) for s in structures])
    ens = _ensemble(tiny_mace, 2)
    th = thermo(3)
    stacked = ens.precision_deviation(tiny_mace.collate(feats), th, precision="bf16")
    assert ens.stack_members is True
    assert 0.0 < stacked < 0.05  # eV/atom: finite (it runs) and bf16 really was used
    ens.stack_members = False
    assert ens.precision_deviation(tiny_mace.collate(feats), th, precision="bf16") == pytest.approx(stacked, abs=1e-6)
    out = ens.member_outputs(tiny_mace.collate(feats), th, "bf16")
    assert out["energy_pa"].dtype == torch.float32 and out["q50"].dtype == torch.float32
    assert all(p.dtype == torch.float32 for m in ens.members for p in m.parameters())


def test_precision_a_backbone_cannot_run_reports_inf(tiny_mace: MaceBackbone,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A precision whose ops fail is reported as inf (the screen then keeps float32), never a
    crash, and does not switch stacking off."""
    structures = small_cathode_structures()[:2]
    feats = tiny_mace.trunk([tiny_mace.build_graph(s) for s in structures])
    ens = _ensemble(tiny_mace, 2)
    real = Ensemble.member_outputs

    def failing(self: Ensemble, batch: dict, thermo: ThermoInputs, precision: str | None = None,
                **kw: object) -> dict:
        if precision == "bf16":
            raise RuntimeError("expected scalar type BFloat16 but found Float")  # e3nn under autocast
        return real(self, batch, thermo, precision, **kw)

    monkeypatch.setattr(Ensemble, "member_outputs", failing)
    assert ens.precision_deviation(tiny_mace.collate(feats), thermo(2), precision="bf16") == float("inf")
    assert ens.stack_members is True


def test_ensemble_load_rejects_unknown_precision(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="precision"):
        Ensemble(backbone=chgnet(), members=[], normalizer=Normalizer(mean=0.0, std=1.0),
                 manifest={}, uri="-", files={}, precision="half")


@pytest.mark.parametrize("stack", [True, False])
def test_predict_graphs_chunks_equal_one_call_on_trunk_features(tiny_mace: MaceBackbone, stack: bool) -> None:
    """The screen's path (graphs -> trunk_batch on the device -> members, chunked) equals cached
    trunk features + predict_feats, with members stacked or looped."""
    structures = small_cathode_structures()
    graphs = [tiny_mace.build_graph(s) for s in structures]
    ens = _ensemble(tiny_mace)
    ens.stack_members = stack
    th = thermo(len(structures))
    chunked = ens.predict_graphs(graphs, th, batch_size=2)
    assert ens.stack_members is stack, "stacking fell back to the loop on trunk_batch's batch"
    whole = ens.predict_feats(tiny_mace.trunk(graphs), th)
    assert chunked.q50.shape == (3, len(structures))
    for k in ("q10", "q50", "q90", "p_stable", "embedding", "zero_shot_ehull"):
        np.testing.assert_allclose(getattr(chunked, k), getattr(whole, k), atol=1e-5)


def test_two_threads_run_the_stacked_bf16_members_one_call_at_a_time(tiny_mace: MaceBackbone,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Stacked members swap weights into one shared module (functional_call), and MACE's bf16 path
    swaps cast copies in: two calls at once (a GPU actor's two threads) must not interleave."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    from cathode_ray.model.stacked import StackedMembers

    structures = small_cathode_structures()
    feats = tiny_mace.trunk([tiny_mace.build_graph(s) for s in structures])
    th = thermo(len(structures))
    ens = perturbed_ensemble(tiny_mace, 3, stack_members=True, precision="bf16")
    alone = ens.predict_feats(feats, th)
    running, most = [0], [0]
    lock, original = threading.Lock(), StackedMembers.__call__

    def watched(self: StackedMembers, *args: object) -> object:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.05)  # wide enough for a second call to walk in
        try:
            return original(self, *args)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(StackedMembers, "__call__", watched)
    with ThreadPoolExecutor(2) as pool:
        preds = list(pool.map(lambda _: ens.predict_feats(feats, th), range(4)))
    assert most[0] == 1 and ens.stack_members and ens.precision == "bf16"
    for got in preds:
        np.testing.assert_array_equal(got.q50, alone.q50)
