"""CHGNet 0.3.0 adapter: trunk = embeddings + the first n_conv-1 atom/bond/angle convolutions;
last block = the last atom convolution + readout norm + energy MLP.

CHGNet predicts MP2020-compatible energies (it was trained on corrected MPtrj energies), so its
energy per atom can be compared with the reference hull directly.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from pymatgen.core import Structure

from .base import (
    Backbone,
    LastBlock,
    TrunkBatch,
    TrunkBatchFn,
    TrunkFeatures,
    batch_to_device,
    segment_mean,
    segment_sum,
    sha256_file,
    strict_float32,
)
from .chgnet_graph import GraphBatch, batch_graphs, crystal_graph
from .chgnet_layers import angle_update, atom_messages, bond_conv, sums_without_bags

CHGNET_VERSION = "0.3.0"


def _chgnet_weights_path() -> str:
    import chgnet

    root = os.path.dirname(chgnet.__file__)
    return os.path.join(root, "pretrained", "0.3.0", "chgnet_0.3.0_e29f68s314m37.pth.tar")


def _atom_conv(conv: Any, *, atom_feas: torch.Tensor, bond_feas: torch.Tensor, bond_weights: torch.Tensor,
               atom_graph: torch.Tensor, directed2undirected: torch.Tensor) -> torch.Tensor:
    """``chgnet.model.layers.AtomConv.forward`` with its gated MLP factored
    (:func:`.chgnet_layers.atom_messages`) and its sums in float32: chgnet's values to float32
    rounding (tested), but under a bf16 autocast only the per-edge gated MLP runs in bfloat16.
    chgnet's own forward sums ~100 messages per atom and adds the residual in place on bfloat16
    tensors, and runs its per-atom output matmul on that sum in bfloat16. On 64 MP structures (five
    perturbed members) that took bf16 from 2.30 to 1.65 meV/atom; the rest is the rounding of the
    edge MLPs' own outputs (``scripts/bench_precision.py``).
    """
    messages = atom_messages(conv, atom_feas=atom_feas, bond_feas=bond_feas, atom_graph=atom_graph,
                             directed2undirected=directed2undirected).float()  # [E, D]
    messages = messages * torch.index_select(bond_weights, 0, directed2undirected).float()
    new = segment_sum(messages, atom_graph[:, 0], atom_feas.shape[0])  # [A, D] float32
    if conv.use_mlp_out:  # one small per-atom matmul on a sum of ~100 messages: float32
        with strict_float32(new):
            new = conv.mlp_out(new)
    if conv.resnet:
        new = new + atom_feas.float()
    if conv.atom_norm is not None:
        new = conv.atom_norm(new)
    return new


def _module_call(layer: Any, **kwargs: torch.Tensor) -> torch.Tensor:
    return layer(**kwargs)


def _graph_tensors(g: Any) -> tuple[torch.Tensor, ...]:
    """The BatchedGraph tensors :func:`trunk_tensors` reads, in its argument order."""
    return (g.atomic_numbers, g.bond_bases_ag, g.bond_bases_bg, g.angle_bases, g.batched_atom_graph,
            g.directed2undirected, g.batched_bond_graph)


def trunk_tensors(
    m: Any, atomic_numbers: torch.Tensor, bond_bases_ag: torch.Tensor, bond_bases_bg: torch.Tensor,
    angle_bases: torch.Tensor, atom_graph: torch.Tensor, directed2undirected: torch.Tensor,
    bond_graph: torch.Tensor, *, factored: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Embeddings and the first n_conv-1 atom/bond/angle convolutions of CHGNet model ``m``, as
    ``CHGNet._compute`` runs them, on one BatchedGraph's tensors: atomic numbers [A], bond bases
    [U, n_rbf] (atom graph) and [U', n_rbf] (bond graph), angle bases [G, n_fourier], atom graph
    [E, 2], directed-to-undirected map [E], bond graph [G, 5].

    ``factored``: the convolutions' gated MLPs factored over their gathered inputs
    (:mod:`.chgnet_layers`, 1.8-2.0x faster on CPU); False runs chgnet's own layer modules, the
    reference that is tested and benchmarked against.

    Returns (atom features [A, D], bond features [U, D], atom-graph bond weights [U, D]). Tensor
    work only, so :meth:`ChgnetBackbone.compile_trunk` can compile it.
    """
    atom_conv, bond_update, angle_layer_update = (
        (_atom_conv, bond_conv, angle_update) if factored else (_module_call, _module_call, _module_call))
    atom_feas = m.atom_embedding(atomic_numbers - 1)
    bond_feas = m.bond_embedding(bond_bases_ag)
    bond_weights_ag = m.bond_weights_ag(bond_bases_ag)
    bond_weights_bg = m.bond_weights_bg(bond_bases_bg)
    angle_feas = m.angle_embedding(angle_bases) if angle_bases.shape[0] != 0 else None
    for atom_layer, bond_layer, angle_layer in zip(
        m.atom_conv_layers[:-1], m.bond_conv_layers, m.angle_layers, strict=False
    ):
        atom_feas = atom_conv(
            atom_layer, atom_feas=atom_feas, bond_feas=bond_feas, bond_weights=bond_weights_ag,
            atom_graph=atom_graph, directed2undirected=directed2undirected,
        )
        if angle_feas is not None and bond_layer is not None:
            bond_feas = bond_update(
                bond_layer, atom_feas=atom_feas, bond_feas=bond_feas, bond_weights=bond_weights_bg,
                angle_feas=angle_feas, bond_graph=bond_graph,
            )
            if angle_layer is not None:
                angle_feas = angle_layer_update(
                    angle_layer, atom_feas=atom_feas, bond_feas=bond_feas, angle_feas=angle_feas,
                    bond_graph=bond_graph,
                )
    return atom_feas, bond_feas, bond_weights_ag


class ChgnetLastBlock(LastBlock):
    """Last AtomConv + readout LayerNorm + per-atom energy MLP of CHGNet (trainable copy)."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.atom_conv = copy.deepcopy(model.atom_conv_layers[-1])
        self.readout_norm = copy.deepcopy(model.readout_norm)
        self.mlp = copy.deepcopy(model.mlp)
        for p in self.parameters():
            p.requires_grad_(True)

    def forward(self, batch: TrunkBatch) -> tuple[torch.Tensor, torch.Tensor]:
        atom_feas = _atom_conv(
            self.atom_conv,
            atom_feas=batch["atom_feas"],  # [A, 64]
            bond_feas=batch["bond_feas"],  # [U, 64] (undirected bonds)
            bond_weights=batch["bond_weights"],  # [U, 64]
            atom_graph=batch["atom_graph"],  # [E, 2] directed, batch-global atom indices
            directed2undirected=batch["directed2undirected"],  # [E]
        )
        with strict_float32(atom_feas):  # the readout: no autocast, no TF32
            atom_feas = atom_feas.float()
            if self.readout_norm is not None:
                atom_feas = self.readout_norm(atom_feas)
            owners = batch["atom_owners"]  # [A]
            n = batch["n_atoms"]  # [B]
            site_e = self.mlp(atom_feas).view(-1)  # [A] eV
            e_pa = segment_sum(site_e, owners, n.shape[0]) / n.to(site_e.dtype) + batch["comp_energy"]
            emb = segment_mean(atom_feas, owners, n)  # [B, 64]
        return e_pa, emb


class ChgnetBackbone(Backbone):
    """CHGNet 0.3.0 from the weights that ship in the chgnet wheel (no download)."""

    energy_is_mp2020_corrected = True
    # 2: graphs batched by batch_graphs (bond bases move by ~1e-6 vs chgnet's loop);
    # 3: convolutions' gated MLPs factored (chgnet_layers; features move by ~1e-6 relative)
    trunk_revision = 3

    def __init__(self, *, device: str = "cpu") -> None:
        from chgnet.model import CHGNet

        self.model = CHGNet.load(model_name=CHGNET_VERSION, use_device="cpu", verbose=False)
        # Isolated atoms are rejected by validation before screening; a labelled training material
        # with one (e.g. mp-1213623, a slab-like Li3NiO6) keeps CHGNet's edge-free treatment.
        self.model.graph_converter.on_isolated_atoms = "ignore"
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.device = torch.device(device)
        self.model.to(self.device)
        self.name = f"chgnet-{CHGNET_VERSION}"
        self.weights_sha256 = sha256_file(_chgnet_weights_path())
        self.cutoff = float(self.model.graph_converter.atom_graph_cutoff)  # Angstrom
        self.embedding_dim = int(self.model.atom_embedding.embedding.embedding_dim)
        self.trunk_embedding_dim = self.embedding_dim

    def build_graph(self, structure: Structure) -> Any:
        """CHGNet CrystalGraph: pymatgen's neighbour list as chgnet takes it, the bond graph built
        with numpy (:mod:`.chgnet_graph`; equal to chgnet's own converter, 3-5x faster)."""
        return crystal_graph(self.model.graph_converter, structure)

    @torch.no_grad()
    def trunk(self, graphs: Sequence[Any], *, device: str | torch.device | None = None) -> list[TrunkFeatures]:
        graphs, g, comp_energy = self._batch_graphs(graphs, device)
        atom_feas, bond_feas, bond_weights = trunk_tensors(self.model, *_graph_tensors(g))
        return self._split(graphs, atom_feas, bond_feas, bond_weights, comp_energy)

    def trunk_batch(self, graphs: Sequence[Any], device: str | torch.device = "cpu") -> TrunkBatch:
        """:meth:`trunk` + :meth:`collate` without leaving ``device`` (same keys and values)."""
        return self._trunk_batch(graphs, device, functools.partial(trunk_tensors, self.model))

    def compile_trunk(self) -> TrunkBatchFn:
        """:meth:`trunk_batch` with :func:`trunk_tensors` compiled; the BatchedGraph is still built
        eagerly on the host. chgnet's modules are compiled as they are, in a few graphs: its
        ``aggregate`` sizes its output with ``torch.bincount``, a data-dependent shape that Dynamo
        runs eagerly between graphs."""
        core = torch.compile(functools.partial(trunk_tensors, self.model), dynamic=True)
        return functools.partial(self._trunk_batch, core=core)

    @torch.inference_mode()
    def _trunk_batch(self, graphs: Sequence[Any], device: str | torch.device,
                     core: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> TrunkBatch:
        graphs, g, comp_energy = self._batch_graphs(graphs, device)
        atom_feas, bond_feas, bond_weights = core(*_graph_tensors(g))
        return {
            "atom_feas": atom_feas,  # [A, D]
            "bond_feas": bond_feas,  # [U, D] undirected bonds
            "bond_weights": bond_weights,  # [U, D]
            "atom_graph": g.batched_atom_graph.long(),  # [E, 2] batch-global (center, neighbour)
            "directed2undirected": g.directed2undirected.long(),  # [E]
            "atom_owners": g.atom_owners.long(),  # [A]
            "n_atoms": g.n_atoms.long(),  # [B]
            "comp_energy": comp_energy.float(),  # [B] eV/atom
            "node_scalars": atom_feas,
        }

    def _batch_graphs(self, graphs: Sequence[Any], device: str | torch.device | None) -> tuple[list[Any], GraphBatch, torch.Tensor]:
        """(graphs, their :class:`GraphBatch` on the device, composition energy [B] eV/atom): host
        work, one pass over the batch (:func:`.chgnet_graph.batch_graphs`)."""
        m = self.model
        graphs = list(graphs)
        g = batch_graphs(graphs, bond_basis_expansion=m.bond_basis_expansion,
                         angle_basis_expansion=m.angle_basis_expansion,
                         n_elements=m.composition_model.max_num_elements,
                         device=device if device is not None else self.device)
        comp_energy = m.composition_model.fc(g.composition).view(-1)  # [B] eV/atom (AtomRef, intensive)
        return graphs, g, comp_energy

    @staticmethod
    def _split(graphs: Sequence[Any], atom_feas: torch.Tensor, bond_feas: torch.Tensor,
               bond_weights: torch.Tensor, comp_energy: torch.Tensor) -> list[TrunkFeatures]:
        out: list[TrunkFeatures] = []
        a0 = u0 = 0
        for i, gr in enumerate(graphs):
            n_atoms = int(gr.atomic_number.shape[0])
            n_und = int(gr.undirected2directed.shape[0])
            out.append({
                "atom_feas": atom_feas[a0:a0 + n_atoms].cpu().clone(),
                "bond_feas": bond_feas[u0:u0 + n_und].cpu().clone(),
                "bond_weights": bond_weights[u0:u0 + n_und].cpu().clone(),
                "atom_graph": gr.atom_graph.reshape(-1, 2).long().cpu(),
                "directed2undirected": gr.directed2undirected.long().cpu(),
                "comp_energy": comp_energy[i:i + 1].float().cpu().clone(),
            })
            a0 += n_atoms
            u0 += n_und
        return out

    def collate(self, feats: Sequence[TrunkFeatures], device: str | torch.device = "cpu") -> TrunkBatch:
        atom_graph, d2u, owners = [], [], []
        a_off = u_off = 0
        for i, f in enumerate(feats):
            n_atoms = f["atom_feas"].shape[0]
            atom_graph.append(f["atom_graph"] + a_off)
            d2u.append(f["directed2undirected"] + u_off)
            owners.append(torch.full((n_atoms,), i, dtype=torch.long))
            a_off += n_atoms
            u_off += f["bond_feas"].shape[0]
        batch = {
            "atom_feas": torch.cat([f["atom_feas"] for f in feats]),
            "bond_feas": torch.cat([f["bond_feas"] for f in feats]),
            "bond_weights": torch.cat([f["bond_weights"] for f in feats]),
            "atom_graph": torch.cat(atom_graph),
            "directed2undirected": torch.cat(d2u),
            "atom_owners": torch.cat(owners),
            "n_atoms": torch.tensor([f["atom_feas"].shape[0] for f in feats], dtype=torch.long),
            "comp_energy": torch.cat([f["comp_energy"] for f in feats]),
        }
        batch["node_scalars"] = batch["atom_feas"]
        return batch_to_device(batch, device)

    def vmap_context(self) -> contextlib.AbstractContextManager[None]:
        """The factored convolutions sum by ``index_select`` under vmap (no batching rule for
        ``embedding_bag``); see :func:`.chgnet_layers.sums_without_bags`."""
        return sums_without_bags()

    def new_last_block(self) -> ChgnetLastBlock:
        return ChgnetLastBlock(self.model).to(self.device)

    @torch.no_grad()
    def reference_energy(self, structures: Sequence[Structure]) -> torch.Tensor:
        """CHGNet's own energy per atom (eV/atom) through its public API, for conformance tests."""
        preds = self.model.predict_structure(list(structures), task="e", batch_size=16)
        preds = preds if isinstance(preds, list) else [preds]
        return torch.tensor([float(p["e"]) for p in preds])
