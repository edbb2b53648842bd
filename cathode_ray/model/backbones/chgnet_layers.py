"""CHGNet's three convolutions with their gated MLPs' first layer factored over the gathered inputs.

Each CHGNet convolution gathers features per edge or angle, concatenates them and runs a gated MLP
whose first linear layer (core and gate) maps the concatenation (192 or 256 columns) to 64 columns:

    GatedMLP(cat([atom[c], bond[i], bond[j], angle]))            # [G, 256] @ [256, 128]

A linear map of a concatenation is the sum of the linear maps of its parts, and a linear map of
gathered rows is the gather of the mapped rows, so the same pre-activation is

    (atom @ W_a)[c] + (bond @ W_i)[i] + (bond @ W_j)[j] + angle @ W_g + b

where the atom and bond products run once per atom or bond instead of once per angle, and the
gathered products are summed per row in one pass by ``embedding_bag``. On 64 MP
Li-TM-O structures there are ~3x more angles than bonds, and the first layers were two thirds of
CHGNet's time on CPU (``scripts/bench_chgnet_layers.py``). Values equal chgnet's modules to float32
rounding (tested); the modules' own weights are used, so trained and frozen weights both apply.
The pieces are summed in float32 even under a bfloat16 autocast.

Pure torch: no chgnet import (the modules come in as arguments).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from .base import segment_sum

_sum_by_bags = True  # False inside sums_without_bags(); a plain global, which torch.compile can read


@contextlib.contextmanager
def sums_without_bags() -> Iterator[None]:
    """Sum gathered products by ``index_select`` + add instead of ``embedding_bag``: for
    ``torch.func.vmap`` over members, which has no batching rule for ``embedding_bag`` (it would
    loop over the members and warn). Same values; process-wide, so a call running meanwhile in
    another thread only takes the other, equal, way."""
    global _sum_by_bags
    previous, _sum_by_bags = _sum_by_bags, False
    try:
        yield
    finally:
        _sum_by_bags = previous


def _first_linear(mlp: Any) -> tuple[nn.Linear, list[nn.Module]] | None:
    """(first Linear, the layers after it) of a chgnet ``MLP``, or None where a layer before the
    first Linear is not the identity (dropout that is on)."""
    layers = list(mlp.layers)
    for i, layer in enumerate(layers):
        if isinstance(layer, nn.Linear):
            return layer, layers[i + 1:]
        if not (isinstance(layer, nn.Dropout) and (layer.p == 0 or not layer.training)):
            return None
    return None


def _run(layers: Sequence[nn.Module], x: torch.Tensor) -> torch.Tensor:
    for layer in layers:
        x = layer(x)
    return x


def _pre_activation(lin: nn.Linear, parts: Sequence[tuple[torch.Tensor, torch.Tensor | None]],
                    bags: torch.Tensor | None) -> torch.Tensor:
    """``lin(cat(parts))`` as a sum of per-part products: the gathered parts' products stacked into
    one table [sum N_k, H] and summed per row by ``embedding_bag`` over ``bags`` [R, K] (their row
    indices, offset into the table; None: by ``index_select`` and add), then the per-row parts'
    products added in place."""
    cols = [0]
    for f, _ in parts:
        cols.append(cols[-1] + f.shape[1])
    w = [lin.weight[:, cols[k]:cols[k + 1]] for k in range(len(parts))]  # [H, D_k] each
    gathered = [k for k, (_, idx) in enumerate(parts) if idx is not None]
    pre: torch.Tensor | None = None
    # the first gathered part carries the bias: every row takes exactly one of its rows
    products = [nn.functional.linear(parts[k][0], w[k], lin.bias if i == 0 else None).float()
                for i, k in enumerate(gathered)]  # [N_k, H] each
    if bags is not None:
        pre = nn.functional.embedding_bag(bags, torch.cat(products), mode="sum")  # [R, H]
    else:
        for k, product in zip(gathered, products, strict=True):
            piece = torch.index_select(product, 0, parts[k][1])  # [R, H]
            pre = piece if pre is None else pre.add_(piece)
    for k, (f, idx) in enumerate(parts):
        if idx is None:
            pre = (nn.functional.linear(f, w[k], lin.bias).float() if pre is None
                   else pre.addmm_(f.to(pre.dtype), w[k].T.to(pre.dtype)))  # [R, H]
    if pre is None:
        raise ValueError("a gated MLP needs at least one input part")
    return pre  # [R, H] float32


def _bags(parts: Sequence[tuple[torch.Tensor, torch.Tensor | None]]) -> torch.Tensor | None:
    """The gathered parts' row indices offset into their stacked table: [R, K] or None."""
    cols, offset = [], 0
    for f, idx in parts:
        if idx is not None:
            cols.append(idx + offset)
            offset += f.shape[0]
    return torch.stack(cols, dim=1) if cols else None


def gated_mlp_of_gathers(gm: Any, parts: Sequence[tuple[torch.Tensor, torch.Tensor | None]]) -> torch.Tensor:
    """``gm(torch.cat([f if idx is None else f[idx] for f, idx in parts], dim=1))`` for a chgnet
    ``GatedMLP`` ``gm``, with the first linear layer applied to each part before its gather.

    ``parts``: (features [N_k, D_k], row index [R] or None where the features are already one row
    per output row [R, D_k]), in the column order of the concatenation. Returns [R, out_dim].
    """
    core, gate = _first_linear(gm.mlp_core), _first_linear(gm.mlp_gate)
    if core is None or gate is None:  # dropout on the concatenation: no factoring
        return gm(torch.cat([f if idx is None else torch.index_select(f, 0, idx) for f, idx in parts], dim=1))
    bags = _bags(parts) if _sum_by_bags else None
    core_out = _run(core[1], _pre_activation(core[0], parts, bags))  # [R, out_dim]
    gate_out = _run(gate[1], _pre_activation(gate[0], parts, bags))  # [R, out_dim]
    if gm.norm is None:
        return gm.activation(core_out) * gm.sigmoid(gate_out)
    return gm.activation(gm.bn1(core_out)) * gm.sigmoid(gm.bn2(gate_out))


def bond_conv(conv: Any, *, atom_feas: torch.Tensor, bond_feas: torch.Tensor, bond_weights: torch.Tensor,
              angle_feas: torch.Tensor, bond_graph: torch.Tensor) -> torch.Tensor:
    """``chgnet.model.layers.BondConv.forward``: atom features [A, D], bond features [U', D] and
    weights [U', D] (bond graph), angle features [G, D], bond graph [G, 3+] (centre atom, bond i,
    bond j). Returns new bond features [U', D]."""
    update = gated_mlp_of_gathers(conv.twoBody_bond, [
        (bond_feas, bond_graph[:, 1]), (bond_feas, bond_graph[:, 2]), (angle_feas, None),
        (atom_feas, bond_graph[:, 0]),
    ])  # [G, D]
    update = (update * torch.index_select(bond_weights, 0, bond_graph[:, 1])
              * torch.index_select(bond_weights, 0, bond_graph[:, 2]))
    new = segment_sum(update, bond_graph[:, 1], bond_feas.shape[0])  # [U', D]
    if conv.use_mlp_out:
        new = conv.mlp_out(new)
    if conv.resnet:
        new = new + bond_feas
    if conv.bond_norm is not None:
        new = conv.bond_norm(new)
    return new


def angle_update(layer: Any, *, atom_feas: torch.Tensor, bond_feas: torch.Tensor, angle_feas: torch.Tensor,
                 bond_graph: torch.Tensor) -> torch.Tensor:
    """``chgnet.model.layers.AngleUpdate.forward``: same inputs as :func:`bond_conv` (new bond
    features) without weights. Returns new angle features [G, D]."""
    new = gated_mlp_of_gathers(layer.twoBody_bond, [
        (bond_feas, bond_graph[:, 1]), (bond_feas, bond_graph[:, 2]), (angle_feas, None),
        (atom_feas, bond_graph[:, 0]),
    ])  # [G, D]
    if layer.resnet:
        new = new + angle_feas
    if layer.angle_norm is not None:
        new = layer.angle_norm(new)
    return new


def atom_messages(conv: Any, *, atom_feas: torch.Tensor, bond_feas: torch.Tensor,
                  atom_graph: torch.Tensor, directed2undirected: torch.Tensor) -> torch.Tensor:
    """The gated MLP of ``chgnet.model.layers.AtomConv`` on its directed edges: atom features
    [A, D], undirected bond features [U, D], atom graph [E, 2] (centre, neighbour), directed-to-
    undirected map [E]. Returns messages [E, D] (before the bond weights and the sum)."""
    return gated_mlp_of_gathers(conv.twoBody_atom, [
        (atom_feas, atom_graph[:, 0]), (bond_feas, directed2undirected), (atom_feas, atom_graph[:, 1]),
    ])
