"""Compiled models (trunk and one torch.compile'd last block for all members) equal the uncompiled ones."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest
import torch
from conformance import small_cathode_structures
from ensembles import perturbed_ensemble, thermo

from cathode_ray.model.backbones import Backbone
from cathode_ray.model.backbones.mace import MaceBackbone
from cathode_ray.model.compiled import CompiledLastBlocks
from cathode_ray.model.ensemble import Ensemble
from cathode_ray.testing.compilers import cxx_compiler_available
from cathode_ray.testing.tiny_mace import build_tiny_mace


def _ensemble(bb: Backbone, n_members: int = 3, **options: bool) -> Ensemble:
    return perturbed_ensemble(bb, n_members, seed=200, compile_model=True, **options)


#: TorchInductor compiles C++ on the CPU; without a compiler the ensemble falls back (tested below).
needs_compiler = pytest.mark.skipif(not cxx_compiler_available(),
                                    reason="TorchInductor needs a C++ compiler (g++/clang++) on the CPU")


def test_mace_compile_template_is_traceable_and_equals_the_last_block(tiny_mace: MaceBackbone) -> None:
    """The template's e3nn contractions are fx graphs (not TorchScript, which Dynamo cannot trace
    into), and with a member's weights it computes what the member's own last block does."""
    block = tiny_mace.new_last_block().eval()
    template = tiny_mace.compile_template(block)
    assert not any(isinstance(m, torch.jit.ScriptModule) for m in template.modules())
    assert any(isinstance(m, torch.jit.ScriptModule) for m in block.modules())  # what it replaces
    with torch.inference_mode():
        batch = tiny_mace.trunk_batch([tiny_mace.build_graph(s) for s in small_cathode_structures()[:3]])
        e_ref, emb_ref = block(batch)
        e, emb = torch.func.functional_call(template, {**dict(block.named_parameters())}, (batch,))
    torch.testing.assert_close(e, e_ref)
    torch.testing.assert_close(emb, emb_ref)


def test_compiled_lastblocks_refuse_members_without_the_templates_parameters(tiny_mace: MaceBackbone) -> None:
    block = tiny_mace.new_last_block().eval()
    template = torch.nn.Sequential(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="lacks parameters of the compile template: 0.bias, 0.weight"):
        CompiledLastBlocks(template, [block])


@pytest.mark.slow
@needs_compiler
def test_compiled_mace_members_equal_loop_across_batch_sizes(tiny_mace: MaceBackbone,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    """Inductor compiles the trunk once and the last blocks once for all members (weights are
    inputs), with dynamic shapes: batches of 4 and then 3 structures both run compiled and equal
    the uncompiled ensemble."""
    structures = small_cathode_structures()
    ens = _ensemble(tiny_mace)
    loop = dataclasses.replace(ens, compile_model=False)
    graphs = [tiny_mace.build_graph(s) for s in structures]
    counters = torch._dynamo.utils.counters["stats"]
    frames = counters["unique_graphs"]
    for sl in (slice(0, 4), slice(1, 4)):
        n = sl.stop - sl.start
        with caplog.at_level(logging.WARNING):
            got = ens.predict_graphs(graphs[sl], thermo(n))
        assert not ens.compile_failures, f"compiled parts fell back: {caplog.text}"
        ref = loop.predict_graphs(graphs[sl], thermo(n))
        assert np.abs(ref.q50[0] - ref.q50[2]).max() > 1e-4  # members really differ
        for k in ("q10", "q50", "q90", "p_stable", "p_metastable", "embedding"):
            np.testing.assert_allclose(getattr(got, k), getattr(ref, k), atol=1e-5)
        np.testing.assert_allclose(got.zero_shot_ehull, ref.zero_shot_ehull, atol=1e-5, equal_nan=True)
    assert counters["unique_graphs"] - frames == 2  # the trunk's, and one for 3 members; both sizes


def test_falls_back_to_the_loop_when_compiling_fails(tiny_mace: MaceBackbone, monkeypatch: pytest.MonkeyPatch,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    structures = small_cathode_structures()[:2]
    ens = _ensemble(tiny_mace, 2)

    def no_template(block: torch.nn.Module) -> torch.nn.Module:
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(tiny_mace, "compile_template", no_template)
    monkeypatch.setattr(tiny_mace, "compile_trunk", lambda: tiny_mace.trunk_batch)  # members only
    graphs = [tiny_mace.build_graph(s) for s in structures]
    with caplog.at_level(logging.WARNING):
        pred = ens.predict_graphs(graphs, thermo(2))
    assert ens.compile_failures == {"members": "RuntimeError: no C++ compiler"}
    assert "compiled members failed (RuntimeError: no C++ compiler)" in caplog.text
    ref = ens.predict_graphs(graphs, thermo(2))
    np.testing.assert_allclose(pred.q50, ref.q50, atol=1e-6)


def test_compile_and_stack_are_alternatives(tiny_mace: MaceBackbone) -> None:
    ens = _ensemble(tiny_mace, 1)
    with pytest.raises(ValueError, match="alternatives"):
        dataclasses.replace(ens, stack_members=True)


def test_plain_mace_cannot_be_compiled_and_the_ensemble_runs_it_uncompiled(
        tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    """mace rebuilds only ScaleShiftMACE (MACE-MP-0's class) from its config: a plain MACE model
    is refused with a clear error, and its compiled ensemble falls back to the loop."""
    bb = MaceBackbone.from_spec(f"mace:{build_tiny_mace(tmp_path / 'plain.model', scale_shift=False, seed=1)}")
    with pytest.raises(NotImplementedError, match="cannot compile MACE"):
        bb.compile_template(bb.new_last_block())
    with pytest.raises(NotImplementedError, match="cannot compile MACE"):
        bb.compile_trunk()
    ens = _ensemble(bb, 2)
    graphs = [bb.build_graph(s) for s in small_cathode_structures()[:2]]
    with caplog.at_level(logging.WARNING):
        pred = ens.predict_graphs(graphs, thermo(2))
    assert set(ens.compile_failures) == {"trunk", "members"} and "cannot compile MACE" in caplog.text
    assert np.isfinite(pred.q50).all()


@pytest.mark.slow
@needs_compiler
def test_two_threads_share_one_compiled_function(tiny_mace: MaceBackbone) -> None:
    """GPU inference actors take two calls at once (threads): both calls run compiled, through
    one CompiledLastBlocks, and predict what the uncompiled members do."""
    from concurrent.futures import ThreadPoolExecutor

    ens = _ensemble(tiny_mace, 2)
    loop = perturbed_ensemble(tiny_mace, 2, seed=200)
    graphs = [tiny_mace.build_graph(s) for s in small_cathode_structures()]
    built = []
    original = CompiledLastBlocks.__init__

    def counting_init(self, *args, **kwargs) -> None:
        built.append(self)
        original(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(CompiledLastBlocks, "__init__", counting_init)
        with ThreadPoolExecutor(2) as pool:
            preds = list(pool.map(lambda sl: ens.predict_graphs(graphs[sl], thermo(3)),
                                  [slice(0, 3), slice(1, 4)]))
    assert not ens.compile_failures and len(built) == 1
    for sl, got in zip([slice(0, 3), slice(1, 4)], preds, strict=True):
        np.testing.assert_allclose(got.q50, loop.predict_graphs(graphs[sl], thermo(3)).q50, atol=1e-5)


def test_trunk_falls_back_by_itself(tiny_mace: MaceBackbone, monkeypatch: pytest.MonkeyPatch,
                                    caplog: pytest.LogCaptureFixture) -> None:
    """A trunk that fails to compile runs uncompiled from then on (logged, recorded), with the
    same batch as the backbone's own trunk; the members' compiling is not switched off."""
    ens = _ensemble(tiny_mace, 2)
    calls = []

    def broken() -> None:
        calls.append(1)
        raise RuntimeError("InvalidCxxCompiler")

    monkeypatch.setattr(tiny_mace, "compile_trunk", broken)
    graphs = [tiny_mace.build_graph(s) for s in small_cathode_structures()[:3]]
    with caplog.at_level(logging.WARNING):
        got = ens.trunk_batch(graphs)
        again = ens.trunk_batch(graphs[:2])
    assert ens.compile_failures == {"trunk": "RuntimeError: InvalidCxxCompiler"} and len(calls) == 1
    assert "compiled trunk failed (RuntimeError: InvalidCxxCompiler); running the trunk uncompiled" in caplog.text
    for key, value in tiny_mace.trunk_batch(graphs).items():
        torch.testing.assert_close(got[key], value)
    assert again["n_atoms"].shape == (2,)


def test_an_error_of_the_structures_is_raised_not_taken_for_a_compiler_failure(tiny_mace: MaceBackbone) -> None:
    """When the uncompiled trunk fails too, the error is the caller's and compiling stays on."""
    ens = _ensemble(tiny_mace, 1)
    with pytest.raises(Exception):  # noqa: B017 - whatever mace raises on an empty batch
        ens.trunk_batch([])
    assert not ens.compile_failures


@pytest.mark.slow
@needs_compiler
def test_compiled_head_only_ensemble_equals_uncompiled(tiny_mace: MaceBackbone) -> None:
    """Head-only members share the pretrained last block: compiled, it runs once per batch
    through a one-block CompiledLastBlocks, and predictions equal the uncompiled ensemble's."""
    ens = _ensemble(tiny_mace, 3, head_only=True)
    plain = dataclasses.replace(ens, compile_model=False)
    graphs = [tiny_mace.build_graph(s) for s in small_cathode_structures()[:3]]
    got, want = ens.predict_graphs(graphs, thermo(3)), plain.predict_graphs(graphs, thermo(3))
    assert not ens.compile_failures and len(ens._compiled.states) == 1
    assert np.abs(want.q50[0] - want.q50[1]).max() > 1e-4  # the heads differ
    for k in ("q10", "q50", "q90", "p_stable", "p_metastable", "embedding"):
        np.testing.assert_allclose(getattr(got, k), getattr(want, k), atol=1e-5)
