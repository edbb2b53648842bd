"""CHGNet's crystal graph built with numpy: the same ``CrystalGraph`` as
``chgnet.graph.CrystalGraphConverter`` (every tensor equal, rows in the same order), 3-5x faster.

chgnet takes the neighbour list from pymatgen (``Structure.get_neighbor_list``, kept here), pairs each
directed edge with its reverse in C, then builds the bond graph (the angles between bonds shorter than
``bond_graph_cutoff``) in a pure-Python loop over Python edge objects: about two thirds of a
structure's graph time (18 of 29 ms for a 30-atom cathode on one core). Here both steps are array
operations that reproduce chgnet's numbering and ordering:

* directed edge ``e`` = row ``e`` of the neighbour list;
* an undirected edge is made by the first of a pair of reverse edges (same atoms swapped, opposite
  image) and numbered in that order; its distance is its first edge's;
* angles: for each undirected edge ``u`` no longer than the cutoff, in order, and for each of its two
  directed edges ``(center, d)`` in turn, every other directed edge ``e`` leaving ``center`` that is
  shorter than the cutoff, visited neighbour by neighbour (neighbours in the order they first appear
  in the list) and by index within a neighbour: row ``[center, u, d, undirected(e), e]``.

A neighbour list whose edges do not all come in reverse pairs is refused with a ``ValueError`` (chgnet
refuses it too, after writing ``bond_graph_error.cif`` to the working directory).

:func:`batch_graphs` assembles many graphs for the model as chgnet's ``BatchedGraph.from_graphs`` does,
but in one pass over the whole batch instead of a loop of small tensor operations per graph: the
index arrays are concatenated on the host and moved to the device together (12 pinned copies per
batch instead of 8 per graph), then bond vectors, radial and angular bases and composition features
are computed once for all graphs.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from chgnet.graph.converter import TORCH_DTYPE
from chgnet.graph.crystalgraph import CrystalGraph
from pymatgen.core import Structure

from .base import batch_to_device


def _reverse_partners(center: np.ndarray, nbr: np.ndarray, image: np.ndarray) -> np.ndarray:
    """Index [E] of each directed edge's reverse (nbr -> center, -image); raises if one is missing."""
    n_e = center.shape[0]
    fwd = np.column_stack([center, nbr, image])  # [E, 5]
    rev = np.column_stack([nbr, center, -image])  # [E, 5]
    keys, inverse = np.unique(np.concatenate([fwd, rev]), axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    fwd_id, rev_id = inverse[:n_e], inverse[n_e:]
    if np.unique(fwd_id).shape[0] != n_e:
        raise ValueError("the neighbour list repeats an edge (same atoms and image)")
    position = np.full(keys.shape[0], -1, dtype=np.int64)
    position[fwd_id] = np.arange(n_e)
    partner = position[rev_id]  # [E]
    if (partner < 0).any() or (partner == np.arange(n_e)).any():
        raise ValueError(f"{int((partner < 0).sum())} of {n_e} neighbour-list edges have no reverse "
                         "edge (a bond at the cutoff seen from one side only); CHGNet cannot build "
                         "its bond graph for this structure")
    return partner


def _outgoing_order(center: np.ndarray, nbr: np.ndarray, n_atoms: int) -> np.ndarray:
    """Directed edge indices [E] sorted as chgnet visits them from each atom: by center, then by the
    neighbour's first appearance among that center's edges, then by index."""
    pair = center * n_atoms + nbr  # [E]
    _, first, inverse = np.unique(pair, return_index=True, return_inverse=True)
    first_seen = first[inverse.reshape(-1)]  # [E] index of the pair's first edge
    return np.lexsort((np.arange(center.shape[0]), first_seen, center))


def bond_graph_arrays(center: np.ndarray, nbr: np.ndarray, image: np.ndarray, distance: np.ndarray,
                      n_atoms: int, cutoff: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Undirected numbering and bond graph of a neighbour list.

    Args:
        center, nbr: atom indices [E] of each directed edge.
        image: periodic image [E, 3] (integers) of the neighbour.
        distance: [E] bond lengths (A).
        n_atoms: atoms in the structure.
        cutoff: bond-graph cutoff (A).

    Returns:
        directed2undirected [E], undirected2directed [U], bond_graph [A, 5] (int64), as chgnet's
        ``Graph.adjacency_list`` and ``Graph.line_graph_adjacency_list`` give them.
    """
    n_e = center.shape[0]
    if n_e == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, np.zeros((0, 5), dtype=np.int64)
    partner = _reverse_partners(center, nbr, image)
    idx = np.arange(n_e)
    creates = idx < partner  # [E] the first edge of each pair makes the undirected edge
    undirected2directed = idx[creates]  # [U]
    und_of_creator = np.cumsum(creates) - 1
    directed2undirected = np.where(creates, und_of_creator, und_of_creator[partner])  # [E]

    # per atom, its short outgoing edges in visiting order: a contiguous slice of `short_sorted`
    order = _outgoing_order(center, nbr, n_atoms)
    short_sorted = order[distance[order] < cutoff]  # [S]
    starts = np.searchsorted(center[short_sorted], np.arange(n_atoms + 1))  # [n_atoms + 1]

    # queries (center, u, d): each short-enough undirected edge's first edge, then its reverse
    first = undirected2directed[distance[undirected2directed] <= cutoff]  # [Q/2]
    q_dir = np.column_stack([first, partner[first]]).reshape(-1)  # [Q]
    q_center = center[q_dir]
    q_und = directed2undirected[q_dir]
    lengths = starts[q_center + 1] - starts[q_center]  # [Q]
    total = int(lengths.sum())
    q_of_row = np.repeat(np.arange(q_dir.shape[0]), lengths)  # [R]
    offsets = np.arange(total) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    other = short_sorted[starts[q_center][q_of_row] + offsets]  # [R]
    keep = other != q_dir[q_of_row]
    q_of_row, other = q_of_row[keep], other[keep]
    bond_graph = np.column_stack([q_center[q_of_row], q_und[q_of_row], q_dir[q_of_row],
                                  directed2undirected[other], other])
    return directed2undirected, undirected2directed, bond_graph


def _int_tensor(rows: np.ndarray) -> torch.Tensor:
    """int32 tensor as chgnet makes it from a Python list (an empty list gives shape [0])."""
    if rows.shape[0] == 0:
        return torch.tensor([], dtype=torch.int32)
    return torch.from_numpy(np.ascontiguousarray(rows, dtype=np.int32))


def _small_int(a: np.ndarray) -> np.ndarray:
    """``a`` (integers) in the smallest of int8/int16/int32 that holds its values exactly."""
    lo, hi = (int(a.min()), int(a.max())) if a.size else (0, 0)
    for dtype in (np.int8, np.int16):
        info = np.iinfo(dtype)
        if info.min <= lo and hi <= info.max:
            return a.astype(dtype)
    return a.astype(np.int32)


def _unpack_crystal_graph(arrays: dict[str, np.ndarray], fields: dict[str, Any]) -> PackedCrystalGraph:
    """The graph that :meth:`PackedCrystalGraph.__reduce__` packed (tensors equal)."""
    atom_graph = arrays["atom_graph"].astype(np.int64)  # [E, 2]
    d2u = arrays["directed2undirected"].astype(np.int64)  # [E]
    pairs = arrays["bond_pairs"].astype(np.int64)  # [G, 2] (d, e): the directed edges of each angle
    bond_graph = np.column_stack([atom_graph[pairs[:, 0], 0], d2u[pairs[:, 0]], pairs[:, 0],
                                  d2u[pairs[:, 1]], pairs[:, 1]])  # [G, 5] as chgnet numbers it
    return PackedCrystalGraph(
        atomic_number=torch.from_numpy(arrays["atomic_number"].astype(np.int32)),
        atom_frac_coord=torch.from_numpy(arrays["atom_frac_coord"]).requires_grad_(True),
        atom_graph=_int_tensor(atom_graph),
        neighbor_image=torch.from_numpy(arrays["neighbor_image"]).to(TORCH_DTYPE),
        directed2undirected=_int_tensor(d2u),
        undirected2directed=_int_tensor(arrays["undirected2directed"]),
        bond_graph=_int_tensor(bond_graph),
        lattice=torch.from_numpy(arrays["lattice"]).requires_grad_(True),
        **fields,
    )


class PackedCrystalGraph(CrystalGraph):
    """A chgnet ``CrystalGraph`` that pickles in about a quarter of the bytes: integers in the smallest
    dtype that holds them, the bond graph as its two directed-edge columns (the other three are looked
    up again on unpickling). The screen moves every graph between processes this way."""

    def __reduce__(self) -> tuple[Any, ...]:
        bond_graph = self.bond_graph.reshape(-1, 5).numpy()
        arrays = {
            "atomic_number": _small_int(self.atomic_number.numpy()),  # [N]
            "atom_frac_coord": self.atom_frac_coord.detach().numpy(),  # [N, 3]
            "atom_graph": _small_int(self.atom_graph.reshape(-1, 2).numpy()),  # [E, 2]
            "neighbor_image": _small_int(self.neighbor_image.numpy().astype(np.int64)),  # [E, 3]
            "directed2undirected": _small_int(self.directed2undirected.numpy()),  # [E]
            "undirected2directed": _small_int(self.undirected2directed.numpy()),  # [U]
            "bond_pairs": _small_int(bond_graph[:, [2, 4]]),  # [G, 2]
            "lattice": self.lattice.detach().numpy(),  # [3, 3] (A)
        }
        fields = {k: getattr(self, k) for k in ("graph_id", "mp_id", "composition",
                                                "atom_graph_cutoff", "bond_graph_cutoff")}
        return _unpack_crystal_graph, (arrays, fields)


def crystal_graph(converter: Any, structure: Structure, graph_id: str | None = None,
                  mp_id: str | None = None) -> PackedCrystalGraph:
    """``converter(structure)`` (a ``chgnet.graph.CrystalGraphConverter``) with the graph built by
    :func:`bond_graph_arrays`; the converter's cutoffs and isolated-atom setting apply. The graph
    is a :class:`PackedCrystalGraph`: a CrystalGraph that pickles compactly."""
    n_atoms = len(structure)
    atomic_number = torch.tensor([site.specie.Z for site in structure], dtype=torch.int32)
    atom_frac_coord = torch.tensor(structure.frac_coords, dtype=TORCH_DTYPE, requires_grad=True)
    lattice = torch.tensor(structure.lattice.matrix, dtype=TORCH_DTYPE, requires_grad=True)
    center, nbr, image, distance = structure.get_neighbor_list(
        r=converter.atom_graph_cutoff, sites=structure.sites, numerical_tol=1e-8)
    center, nbr = center.astype(np.int64), nbr.astype(np.int64)
    directed2undirected, undirected2directed, bond_graph = bond_graph_arrays(
        center, nbr, np.asarray(image, dtype=np.int64), distance, n_atoms,
        float(converter.bond_graph_cutoff))

    n_isolated = n_atoms - np.unique(center).shape[0]
    if n_isolated:
        msg = (f"Structure graph_id={graph_id!r} has {n_isolated} isolated atom(s) with "
               f"atom_graph_cutoff={converter.atom_graph_cutoff!r}. CHGNet calculation will likely go wrong")
        if converter.on_isolated_atoms == "error":
            raise ValueError(msg)
        if converter.on_isolated_atoms == "warn":
            print(msg, file=sys.stderr)

    return PackedCrystalGraph(
        atomic_number=atomic_number,
        atom_frac_coord=atom_frac_coord,
        atom_graph=_int_tensor(np.column_stack([center, nbr])),  # [E, 2] (center, neighbour)
        neighbor_image=torch.tensor(image, dtype=TORCH_DTYPE),  # [E, 3]
        directed2undirected=_int_tensor(directed2undirected),  # [E]
        undirected2directed=_int_tensor(undirected2directed),  # [U]
        bond_graph=_int_tensor(bond_graph),  # [A, 5]
        lattice=lattice,
        graph_id=graph_id,
        mp_id=mp_id,
        composition=structure.composition.formula,
        atom_graph_cutoff=converter.atom_graph_cutoff,
        bond_graph_cutoff=converter.bond_graph_cutoff,
    )


@dataclass(frozen=True)
class GraphBatch:
    """The tensors of chgnet's ``BatchedGraph`` that the trunk reads, plus the composition model's
    input; all on one device. A atoms, E directed edges, U undirected edges, G angles, B graphs."""

    atomic_numbers: torch.Tensor  # [A] int32
    bond_bases_ag: torch.Tensor  # [U, n_radial] atom-graph radial basis
    bond_bases_bg: torch.Tensor  # [U, n_radial] bond-graph radial basis
    angle_bases: torch.Tensor  # [G, n_angular]
    batched_atom_graph: torch.Tensor  # [E, 2] int32 (center, neighbour), batch-global atoms
    directed2undirected: torch.Tensor  # [E] int32, batch-global undirected edges
    batched_bond_graph: torch.Tensor  # [G, 3] int32 (center atom, bond u, bond v), batch-global
    atom_owners: torch.Tensor  # [A] int32 graph of each atom
    n_atoms: torch.Tensor  # [B] atoms per graph
    composition: torch.Tensor  # [B, n_elements] element fractions (chgnet's AtomRef input)


def _offsets(sizes: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Exclusive prefix sum of ``sizes`` [B], repeated ``counts`` [B] times per graph."""
    starts = torch.cumsum(sizes, 0) - sizes  # [B]
    return torch.repeat_interleave(starts, counts)


def batch_graphs(graphs: Sequence[Any], *, bond_basis_expansion: Any, angle_basis_expansion: Any,
                 n_elements: int, device: str | torch.device = "cpu") -> GraphBatch:
    """Assemble chgnet ``CrystalGraph``s (on the host) into one :class:`GraphBatch` on ``device``.

    The same values as ``BatchedGraph.from_graphs(..., compute_stress=False)`` and chgnet's
    ``AtomRef._assemble_graphs`` (to float32 rounding: positions and bond vectors are summed
    elementwise instead of by one matmul per graph), and the same for a graph in any batch.
    chgnet's loop runs ~114 tensor operations per graph on the device and reads each cell volume
    back to the host; here the host joins the graphs (:func:`join_graphs`), 12 pinned copies per
    batch move them to a CUDA device, and :func:`featurize` runs a fixed ~120 operations per batch
    there with no read-back.

    Args:
        graphs: CrystalGraphs (CPU tensors: the screen's graphs arrive unpickled on the host).
        bond_basis_expansion: chgnet's ``BondEncoder`` (its ``rbf_expansion_ag`` / ``_bg``).
        angle_basis_expansion: chgnet's ``AngleEncoder``.
        n_elements: width of the composition features (chgnet's ``max_num_elements``, 94).
        device: where the batch goes.
    """
    on_dev = batch_to_device(join_graphs(graphs), device)
    return featurize(on_dev, bond_basis_expansion=bond_basis_expansion,
                     angle_basis_expansion=angle_basis_expansion, n_elements=n_elements)


def join_graphs(graphs: Sequence[Any]) -> dict[str, torch.Tensor]:
    """Host side of :func:`batch_graphs`: the graphs' tensors concatenated, their indices made
    batch-global. Keys and shapes as :func:`featurize` reads them."""
    n_atoms = torch.tensor([g.atomic_number.shape[0] for g in graphs])  # [B]
    n_dir = torch.tensor([g.neighbor_image.shape[0] for g in graphs])  # [B]
    n_und = torch.tensor([g.undirected2directed.shape[0] for g in graphs])  # [B]
    n_ang = torch.tensor([g.bond_graph.reshape(-1, 5).shape[0] for g in graphs])  # [B]
    atom_graph = torch.cat([g.atom_graph.reshape(-1, 2) for g in graphs])  # [E, 2] per-graph indices
    bond_graph = torch.cat([g.bond_graph.reshape(-1, 5) for g in graphs])  # [G, 5] per-graph indices
    atom_off = _offsets(n_atoms, n_dir).to(atom_graph.dtype)  # [E]
    und_off = _offsets(n_und, n_dir).to(atom_graph.dtype)  # [E]
    ang_atom_off = _offsets(n_atoms, n_ang).to(bond_graph.dtype)  # [G]
    ang_und_off = _offsets(n_und, n_ang).to(bond_graph.dtype)  # [G]
    ang_dir_off = _offsets(n_dir, n_ang).to(bond_graph.dtype)  # [G]
    b = torch.arange(len(graphs))
    return {
        "atomic_numbers": torch.cat([g.atomic_number for g in graphs]),  # [A]
        "frac": torch.cat([g.atom_frac_coord.detach() for g in graphs]),  # [A, 3]
        "lattice": torch.stack([g.lattice.detach() for g in graphs]),  # [B, 3, 3] (A)
        "image": torch.cat([g.neighbor_image for g in graphs]),  # [E, 3]
        "atom_graph": atom_graph + atom_off[:, None],  # [E, 2]
        "d2u": torch.cat([g.directed2undirected for g in graphs]) + und_off,  # [E]
        "u2d": torch.cat([g.undirected2directed for g in graphs]) + _offsets(n_dir, n_und).to(atom_graph.dtype),
        "bond_graph": torch.stack([bond_graph[:, 0] + ang_atom_off, bond_graph[:, 1] + ang_und_off,
                                   bond_graph[:, 3] + ang_und_off], dim=1),  # [G, 3]
        "angle_dirs": torch.stack([bond_graph[:, 2], bond_graph[:, 4]], dim=1) + ang_dir_off[:, None],  # [G, 2]
        "atom_owners": torch.repeat_interleave(b, n_atoms).to(torch.int32),  # [A]
        "edge_owners": torch.repeat_interleave(b, n_dir),  # [E]
        "n_atoms": n_atoms,  # [B]
    }


def _row_times_matrix(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``x[i] @ m[i]`` for x [N, 3] and m [N, 3, 3], as elementwise products and sums: a row's
    result does not depend on the other rows (a batched matmul's can, by the batch's size), so a
    structure's features are the same in any batch."""
    return x[:, 0, None] * m[:, 0] + x[:, 1, None] * m[:, 1] + x[:, 2, None] * m[:, 2]


def featurize(t: dict[str, torch.Tensor], *, bond_basis_expansion: Any, angle_basis_expansion: Any,
              n_elements: int) -> GraphBatch:
    """Device side of :func:`batch_graphs`: bond vectors, radial and angular bases and composition
    features of :func:`join_graphs`' tensors, for all graphs at once."""
    owners = t["atom_owners"].long()  # [A]
    cart = _row_times_matrix(t["frac"], t["lattice"][owners])  # [A, 3] (A)
    center, nbr = t["atom_graph"][:, 0].long(), t["atom_graph"][:, 1].long()
    shift = _row_times_matrix(t["image"], t["lattice"][t["edge_owners"]])  # [E, 3] (A)
    bond_vectors = cart[center] - (cart[nbr] + shift)  # [E, 3]
    lengths = torch.norm(bond_vectors, dim=1)  # [E] (A)
    bond_vectors = bond_vectors / lengths[:, None]
    und_lengths = torch.index_select(lengths, 0, t["u2d"].long())  # [U]
    ang = t["angle_dirs"].long()
    angle_bases = angle_basis_expansion(torch.index_select(bond_vectors, 0, ang[:, 0]),
                                        torch.index_select(bond_vectors, 0, ang[:, 1]))  # [G, n_angular]
    composition = torch.zeros(t["n_atoms"].shape[0], n_elements, device=owners.device)  # [B, n_elements]
    composition.index_put_((owners, t["atomic_numbers"].long() - 1),
                           torch.ones_like(owners, dtype=composition.dtype), accumulate=True)
    composition = composition / t["n_atoms"].to(composition)[:, None]
    return GraphBatch(
        atomic_numbers=t["atomic_numbers"],
        bond_bases_ag=bond_basis_expansion.rbf_expansion_ag(und_lengths),
        bond_bases_bg=bond_basis_expansion.rbf_expansion_bg(und_lengths),
        angle_bases=angle_bases,
        batched_atom_graph=t["atom_graph"],
        directed2undirected=t["d2u"],
        batched_bond_graph=t["bond_graph"],
        atom_owners=t["atom_owners"],
        n_atoms=t["n_atoms"],
        composition=composition,
    )
