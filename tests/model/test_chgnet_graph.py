"""The numpy crystal graph equals chgnet's own converter tensor for tensor, row for row."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conformance import small_cathode_structures
from pymatgen.core import Lattice, Structure

from cathode_ray.model.backbones.chgnet_graph import batch_graphs, bond_graph_arrays, crystal_graph
from tests.chgnet_data import chgnet, layered_cells

FIELDS = ("atomic_number", "atom_frac_coord", "atom_graph", "neighbor_image", "directed2undirected",
          "undirected2directed", "bond_graph", "lattice")


def assert_same_graph(ours: object, theirs: object, label: str) -> None:
    for field in FIELDS:
        a, b = getattr(ours, field), getattr(theirs, field)
        assert a.dtype == b.dtype and a.shape == b.shape, f"{label}: {field} {a.shape} vs {b.shape}"
        assert torch.equal(a, b), f"{label}: {field} differs"
    assert ours.composition == theirs.composition
    assert ours.bond_graph_cutoff == theirs.bond_graph_cutoff


def odd_structures() -> dict[str, Structure]:
    """Cells where numbering is easy to get wrong: self-image bonds, many images, no angles."""
    return {
        "one-atom bcc Li (self-image bonds, none under 3 A)": Structure(Lattice.cubic(3.5), ["Li"], [[0, 0, 0]]),
        "one-atom fcc Ni (self-image angles)": Structure(
            Lattice.from_parameters(2.5, 2.5, 2.5, 60, 60, 60), ["Ni"], [[0, 0, 0]]),
        "dense 2 A cubic LiO (many images per pair)": Structure(
            Lattice.cubic(2.0), ["Li", "O"], [[0, 0, 0], [0.5, 0.5, 0.5]]),
        "an isolated Mn": Structure(Lattice.cubic(30), ["Li", "O", "Mn"],
                                    [[0, 0, 0], [0.05, 0, 0], [0.5, 0.5, 0.5]]),
        "elongated cell": Structure(Lattice.tetragonal(3.0, 12.0), ["Li", "O"], [[0, 0, 0], [0.5, 0.5, 0.5]]),
    }


def test_small_and_odd_cells_give_chgnets_graph() -> None:
    converter = chgnet().model.graph_converter  # on_isolated_atoms = "ignore", as the screen has it
    cases = {**odd_structures(), **{f"cathode {i}": s for i, s in enumerate(small_cathode_structures())},
             **{f"strained layered {i}": s for i, s in enumerate(layered_cells(4))}}
    for label, structure in cases.items():
        assert_same_graph(crystal_graph(converter, structure), converter(structure), label)
    assert chgnet().build_graph(cases["cathode 2"]).bond_graph.shape[1] == 5


def test_real_mp_structures_give_chgnets_graph(shared_data: Path) -> None:
    converter = chgnet().model.graph_converter
    with gzip.open(shared_data / "mp_litmo_summary.jsonl.gz", "rt") as fh:
        docs = [json.loads(line) for line in fh][::8]  # ~170 of 1,326; all 1,326 checked by hand
    for doc in docs:
        s = Structure.from_dict(doc["structure"])
        assert_same_graph(crystal_graph(converter, s), converter(s), doc["material_id"])


def test_graphs_pickle_compactly_and_come_back_equal() -> None:
    """What the screen moves between processes: the same graph in about a third of the bytes."""
    import pickle

    from chgnet.graph.crystalgraph import CrystalGraph

    converter = chgnet().model.graph_converter
    cases = {**odd_structures(), **{f"cathode {i}": s for i, s in enumerate(small_cathode_structures())}}
    packed = plain = 0
    for label, structure in cases.items():
        graph = crystal_graph(converter, structure)
        data = pickle.dumps(graph)
        back = pickle.loads(data)
        assert isinstance(back, CrystalGraph)
        assert_same_graph(back, converter(structure), label)
        assert back.atom_frac_coord.requires_grad and back.lattice.requires_grad  # as chgnet makes them
        assert back.graph_id == graph.graph_id and back.atom_graph_cutoff == graph.atom_graph_cutoff
        packed += len(data)
        plain += len(pickle.dumps(graph.to("cpu")))  # chgnet's own CrystalGraph
    assert packed < 0.5 * plain


def test_isolated_atoms_follow_the_converters_setting() -> None:
    converter = chgnet().model.graph_converter
    isolated = odd_structures()["an isolated Mn"]
    saved = converter.on_isolated_atoms
    try:
        converter.on_isolated_atoms = "error"
        with pytest.raises(ValueError, match="1 isolated atom"):
            crystal_graph(converter, isolated)
    finally:
        converter.on_isolated_atoms = saved


def test_a_bond_seen_from_one_side_only_is_refused() -> None:
    """Two atoms, three directed bonds: 0->1, 1->0 and 0->1 in the next cell, whose reverse is missing."""
    center, nbr = np.array([0, 1, 0]), np.array([1, 0, 1])
    image = np.array([[0, 0, 0], [0, 0, 0], [1, 0, 0]])
    distance = np.array([2.0, 2.0, 5.999])
    with pytest.raises(ValueError, match="1 of 3 neighbour-list edges have no reverse"):
        bond_graph_arrays(center, nbr, image, distance, 2, 3.0)
    d2u, u2d, bonds = bond_graph_arrays(center[:2], nbr[:2], image[:2], distance[:2], 2, 3.0)
    assert d2u.tolist() == [0, 0] and u2d.tolist() == [0] and bonds.shape == (0, 5)
    with pytest.raises(ValueError, match="repeats an edge"):
        bond_graph_arrays(np.array([0, 0, 1]), np.array([1, 1, 0]), np.zeros((3, 3), dtype=int),
                          np.array([2.0, 2.0, 2.0]), 2, 3.0)


BATCH_FIELDS = ("atomic_numbers", "bond_bases_ag", "bond_bases_bg", "angle_bases", "batched_atom_graph",
                "directed2undirected", "batched_bond_graph", "atom_owners")
BASES = ("bond_bases_ag", "bond_bases_bg", "angle_bases")

#: Relative float32 error allowed in a bond length, and absolute error in the cosine of an angle
#: (several float32 roundings of values of order 1).
LENGTH_REL_ERR = COSINE_ERR = 1e-6
#: Error of evaluating a basis function in float32 (sin of arguments up to ~30, times ~1).
FLOAT32_EVAL_ERR = 1e-5


def _float64_batch(graphs: list[object], m: object, *, scale: float = 1.0) -> object:
    """chgnet's BatchedGraph of ``graphs`` computed in float64, the cells scaled by ``scale``."""
    import copy

    from chgnet.model.model import BatchedGraph

    graphs64 = []
    for g in graphs:
        g64 = copy.copy(g)
        g64.atom_frac_coord = g.atom_frac_coord.detach().double()
        g64.lattice = g.lattice.detach().double() * scale
        g64.neighbor_image = g.neighbor_image.double()
        graphs64.append(g64)
    return BatchedGraph.from_graphs(graphs64, bond_basis_expansion=copy.deepcopy(m.bond_basis_expansion).double(),
                                    angle_basis_expansion=copy.deepcopy(m.angle_basis_expansion).double())


def _rounding_tolerance(exact: object, scaled: object, field: str, order: int) -> torch.Tensor:
    """How far float32 rounding can move each basis value (same shape as the field): the
    evaluation's own FLOAT32_EVAL_ERR plus what rounding of the inputs does.

    Radial bases: the change when every length moves by LENGTH_REL_ERR (the float64 batch of cells
    scaled by that much). Angular bases ``[1/sqrt 2, sin k theta, cos k theta] / sqrt pi``, k <= order:
    a cosine error of COSINE_ERR moves theta by COSINE_ERR / sin(theta), and each value by at most k /
    sqrt(pi) times that. Near 180 degrees (O-M-O across an octahedron; chgnet scales cosines by
    1 - 1e-6, so sin(theta) >= 1.4e-3) this is ~1e-3, and which way a CPU's matmul kernel rounds
    decides it: fixed tolerances pass on one machine and fail on another."""
    if field != "angle_bases":
        return (getattr(scaled, field) - getattr(exact, field)).abs() + FLOAT32_EVAL_ERR
    sin_theta = (exact.angle_bases[:, 1] * math.sqrt(math.pi)).clamp_min(1e-4)  # [G]
    return (order / math.sqrt(math.pi) * COSINE_ERR / sin_theta)[:, None].expand_as(exact.angle_bases) + FLOAT32_EVAL_ERR


def assert_same_batch(graphs: list[object], label: str) -> None:
    """batch_graphs gives chgnet's BatchedGraph and AtomRef's input: indices and composition equal,
    bases within float32 rounding of a float64 computation (:func:`_rounding_tolerance`)."""
    from chgnet.model.model import BatchedGraph

    m = chgnet().model
    theirs = BatchedGraph.from_graphs(graphs, bond_basis_expansion=m.bond_basis_expansion,
                                      angle_basis_expansion=m.angle_basis_expansion)
    ours = batch_graphs(graphs, bond_basis_expansion=m.bond_basis_expansion,
                        angle_basis_expansion=m.angle_basis_expansion, n_elements=94)
    exact = _float64_batch(graphs, m)
    scaled = _float64_batch(graphs, m, scale=1 + LENGTH_REL_ERR)
    for field in BATCH_FIELDS:
        a, b = getattr(ours, field), getattr(theirs, field)
        if b.numel() == 0:  # chgnet gives an empty float tensor when no graph has angles
            assert a.numel() == 0, f"{label}: {field}"
            continue
        assert a.dtype == b.dtype and a.shape == b.shape, f"{label}: {field} {a.shape} vs {b.shape}"
        if field not in BASES:
            assert torch.equal(a, b), f"{label}: {field} differs"
            continue
        tol = _rounding_tolerance(exact, scaled, field, m.angle_basis_expansion.fourier_expansion.order)
        excess = (a.double() - getattr(exact, field)).abs() - tol
        assert excess.max() <= 0, (f"{label}: {field}: {int((excess > 0).sum())} values beyond float32 "
                                   f"rounding of the float64 bases (worst by {excess.max():.2e})")
    torch.testing.assert_close(m.composition_model.fc(ours.composition).view(-1), m.composition_model(graphs),
                               rtol=0, atol=0)


def test_batched_graphs_equal_chgnets_batch() -> None:
    converter = chgnet().model.graph_converter
    odd = odd_structures()
    cathodes = small_cathode_structures() + layered_cells(3)
    assert_same_batch([crystal_graph(converter, s) for s in cathodes], "cathodes")
    assert_same_batch([crystal_graph(converter, s) for s in [cathodes[0], *odd.values(), cathodes[1]]], "odd")
    no_angles = odd["one-atom bcc Li (self-image bonds, none under 3 A)"]
    assert_same_batch([crystal_graph(converter, no_angles)] * 2, "no angles at all")
    assert_same_batch([crystal_graph(converter, cathodes[2])], "one graph")


def test_a_graphs_bases_do_not_depend_on_its_batch() -> None:
    m = chgnet().model
    graphs = [crystal_graph(m.graph_converter, s) for s in small_cathode_structures() + layered_cells(40)]
    kw = {"bond_basis_expansion": m.bond_basis_expansion, "angle_basis_expansion": m.angle_basis_expansion,
          "n_elements": 94}
    with torch.no_grad():
        alone, together = batch_graphs(graphs[:1], **kw), batch_graphs(graphs, **kw)
    for field in ("bond_bases_ag", "bond_bases_bg", "angle_bases"):
        a = getattr(alone, field)
        assert torch.equal(a, getattr(together, field)[:a.shape[0]]), field


def test_batched_graphs_of_real_mp_structures(shared_data: Path) -> None:
    with gzip.open(shared_data / "mp_litmo_summary.jsonl.gz", "rt") as fh:
        docs = [json.loads(line) for line in fh][1::40]  # ~33 structures, up to ~100 atoms
    converter = chgnet().model.graph_converter
    assert_same_batch([crystal_graph(converter, Structure.from_dict(d["structure"])) for d in docs], "MP")
