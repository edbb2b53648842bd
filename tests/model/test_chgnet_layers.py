"""CHGNet's convolutions with factored gated MLPs equal chgnet's own modules."""

from __future__ import annotations

import gzip
import itertools
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conformance import small_cathode_structures
from pymatgen.core import Structure

from cathode_ray.model.backbones.chgnet import _graph_tensors, trunk_tensors
from cathode_ray.model.backbones.chgnet_layers import (
    angle_update,
    atom_messages,
    bond_conv,
    gated_mlp_of_gathers,
    sums_without_bags,
)
from tests.chgnet_data import chgnet, layered_cells


def layer_inputs(structures: list[Structure]) -> tuple[Any, dict[str, torch.Tensor]]:
    """(model, inputs of the second convolution round: features after one round of chgnet's own layers)."""
    bb = chgnet()
    m = bb.model
    _, g, _ = bb._batch_graphs([bb.build_graph(s) for s in structures], "cpu")
    atomic_numbers, bases_ag, bases_bg, angle_bases, atom_graph, d2u, bond_graph = _graph_tensors(g)
    with torch.no_grad():
        atom_feas = m.atom_conv_layers[0](
            atom_feas=m.atom_embedding(atomic_numbers - 1), bond_feas=m.bond_embedding(bases_ag),
            bond_weights=m.bond_weights_ag(bases_ag), atom_graph=atom_graph, directed2undirected=d2u)
    return m, {"atom_feas": atom_feas, "bond_feas": m.bond_embedding(bases_ag).detach(),
               "bond_weights_ag": m.bond_weights_ag(bases_ag).detach(),
               "bond_weights_bg": m.bond_weights_bg(bases_bg).detach(),
               "angle_feas": m.angle_embedding(angle_bases).detach(), "atom_graph": atom_graph,
               "directed2undirected": d2u, "bond_graph": bond_graph}


def test_each_convolution_equals_chgnets_module() -> None:
    m, x = layer_inputs(small_cathode_structures() + layered_cells(3))
    assert x["bond_graph"].shape[0] > 3 * x["bond_feas"].shape[0] // 2  # many angles per bond: worth factoring
    with torch.no_grad():
        conv = m.atom_conv_layers[1]
        ours = atom_messages(conv, atom_feas=x["atom_feas"], bond_feas=x["bond_feas"],
                             atom_graph=x["atom_graph"], directed2undirected=x["directed2undirected"])
        theirs = conv.twoBody_atom(torch.cat([x["atom_feas"][x["atom_graph"][:, 0]],
                                              x["bond_feas"][x["directed2undirected"]],
                                              x["atom_feas"][x["atom_graph"][:, 1]]], dim=1))
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)

        kwargs = {"atom_feas": x["atom_feas"], "bond_feas": x["bond_feas"], "bond_weights": x["bond_weights_bg"],
                  "angle_feas": x["angle_feas"], "bond_graph": x["bond_graph"]}
        new_bonds = bond_conv(m.bond_conv_layers[0], **kwargs)
        torch.testing.assert_close(new_bonds, m.bond_conv_layers[0](**kwargs), rtol=1e-5, atol=1e-5)

        kwargs = {"atom_feas": x["atom_feas"], "bond_feas": new_bonds, "angle_feas": x["angle_feas"],
                  "bond_graph": x["bond_graph"]}
        torch.testing.assert_close(angle_update(m.angle_layers[0], **kwargs), m.angle_layers[0](**kwargs),
                                   rtol=1e-5, atol=1e-5)


def test_trunk_equals_chgnets_layers_on_real_structures(shared_data: Path) -> None:
    bb = chgnet()
    with gzip.open(shared_data / "mp_litmo_summary.jsonl.gz", "rt") as fh:
        docs = [json.loads(line) for line in itertools.islice(fh, 0, 400, 25)]  # 16 real MP materials
    _, g, _ = bb._batch_graphs([bb.build_graph(Structure.from_dict(d["structure"])) for d in docs], "cpu")
    with torch.no_grad():
        ours, theirs = trunk_tensors(bb.model, *_graph_tensors(g)), trunk_tensors(bb.model, *_graph_tensors(g), factored=False)
    for name, a, b in zip(("atom features", "bond features", "bond weights"), ours, theirs, strict=True):
        scale = float(b.abs().max())
        assert float((a - b).abs().max()) <= 5e-6 * scale, name  # float32 rounding of a reordered sum


@pytest.mark.parametrize("norm", [None, "layer"])
@pytest.mark.parametrize("bias", [True, False])
def test_gated_mlp_of_gathers_equals_the_module_on_the_concatenation(norm: str | None, bias: bool) -> None:
    from chgnet.model.functions import GatedMLP

    torch.manual_seed(0)
    gm = GatedMLP(input_dim=3 + 5 + 4, output_dim=6, hidden_dim=[7, 8], norm=norm, bias=bias).eval()
    a, b, rows = torch.randn(10, 3), torch.randn(4, 5), torch.randn(20, 4)
    ia, ib = torch.randint(0, 10, (20,)), torch.randint(0, 4, (20,))
    parts = [(a, ia), (b, ib), (rows, None)]
    with torch.no_grad():
        torch.testing.assert_close(gated_mlp_of_gathers(gm, parts), gm(torch.cat([a[ia], b[ib], rows], dim=1)),
                                   rtol=1e-5, atol=1e-6)


def test_sums_without_bags_give_the_same_values() -> None:
    """The index_select sums used under vmap equal the embedding_bag sums."""
    m, x = layer_inputs(layered_cells(3))
    kwargs = {"atom_feas": x["atom_feas"], "bond_feas": x["bond_feas"], "bond_weights": x["bond_weights_bg"],
              "angle_feas": x["angle_feas"], "bond_graph": x["bond_graph"]}
    with torch.no_grad():
        bags = bond_conv(m.bond_conv_layers[0], **kwargs)
        with sums_without_bags():
            plain = bond_conv(m.bond_conv_layers[0], **kwargs)
    torch.testing.assert_close(bags, plain, rtol=1e-5, atol=1e-5)


def test_active_dropout_on_the_concatenation_runs_the_module_itself() -> None:
    from chgnet.model.functions import GatedMLP

    gm = GatedMLP(input_dim=6, output_dim=4, hidden_dim=0, dropout=0.5, norm=None).train()
    a, idx, rows = torch.randn(5, 2), torch.tensor([0, 4, 4, 1]), torch.randn(4, 4)
    torch.manual_seed(1)
    ours = gated_mlp_of_gathers(gm, [(a, idx), (rows, None)])
    torch.manual_seed(1)
    theirs = gm(torch.cat([a[idx], rows], dim=1))
    assert torch.equal(ours, theirs)


def test_gradients_equal_chgnets_for_a_trained_last_convolution() -> None:
    """Last-block members train the last AtomConv through the factored MLP: same gradients."""
    from cathode_ray.model.backbones.chgnet import _atom_conv

    bb = chgnet()
    batch = bb.trunk_batch([bb.build_graph(s) for s in layered_cells(3)])
    kwargs = {k: batch[k].clone()  # out of inference mode, as training's cached features are
              for k in ("atom_feas", "bond_feas", "bond_weights", "atom_graph", "directed2undirected")}
    block = bb.new_last_block()
    grads = []
    for fn in (lambda: _atom_conv(block.atom_conv, **kwargs), lambda: block.atom_conv(**kwargs)):
        block.zero_grad()
        (fn() ** 2).sum().backward()
        grads.append({n: p.grad.clone() for n, p in block.atom_conv.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 4
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-4, msg=name)
