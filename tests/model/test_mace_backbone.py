"""MaceBackbone on random-weight tiny MACE models (``mace:PATH``) and the offline foundation path."""

from __future__ import annotations

import functools
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from conformance import check_backbone, small_cathode_structures
from pymatgen.core import Lattice, Structure

from cathode_ray.model.backbones import load_backbone
from cathode_ray.model.backbones.base import sha256_file
from cathode_ray.model.backbones.mace import (
    GRAPH_FIELDS,
    BackboneUnavailableError,
    MaceBackbone,
    WeightsMismatchError,
    foundation_key,
)
from cathode_ray.testing.tiny_mace import build_tiny_mace


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_mace(tmp_path_factory.mktemp("mace") / "tiny.model", r_max=4.0, seed=0)


@pytest.fixture(scope="module")
def tiny(tiny_path: Path) -> MaceBackbone:
    return MaceBackbone.from_spec(f"mace:{tiny_path}")


def test_conformance_scale_shift_mace(tiny: MaceBackbone) -> None:
    errs = check_backbone(tiny, small_cathode_structures())
    assert errs["energy_err"] < 1e-4


def test_conformance_plain_mace_three_layers(tmp_path: Path) -> None:
    """Plain MACE (no scale/shift) with two frozen readouts in the trunk."""
    path = build_tiny_mace(tmp_path / "plain.model", num_interactions=3, scale_shift=False, seed=1)
    check_backbone(MaceBackbone.from_spec(f"mace:{path}"), small_cathode_structures()[:3])


def test_graphs_keep_only_what_the_model_reads_in_its_dtype(tiny: MaceBackbone) -> None:
    """Training labels and weights are dropped and floats stored in the model's dtype, so graphs
    cost less to pickle between stages; the edges are mace's own (float64 neighbour list)."""
    import pickle

    from mace.data import AtomicData, config_from_atoms
    from mace.tools import torch_tools
    from mace.tools.utils import AtomicNumberTable
    from pymatgen.io.ase import AseAtomsAdaptor

    s = small_cathode_structures()[3]
    graph = tiny.build_graph(s)
    assert set(graph.keys) == set(GRAPH_FIELDS)
    assert all(graph[k].dtype == torch.float32 for k in graph.keys if graph[k].is_floating_point())
    with torch_tools.default_dtype(torch.float64):
        full = AtomicData.from_config(config_from_atoms(AseAtomsAdaptor.get_atoms(s), head_name=tiny.head),
                                      z_table=AtomicNumberTable(tiny.z_list), cutoff=tiny.cutoff,
                                      heads=tiny.heads)
    assert len(full.keys) > 2 * len(graph.keys)
    assert torch.equal(graph.edge_index, full.edge_index)
    assert torch.allclose(graph.shifts.double(), full.shifts, atol=1e-5)
    assert len(pickle.dumps(graph)) < 0.6 * len(pickle.dumps(full))


def test_identity_and_features(tiny: MaceBackbone, tiny_path: Path) -> None:
    assert tiny.name == f"mace:{tiny_path}"
    assert tiny.weights_sha256 == sha256_file(tiny_path)
    assert tiny.cutoff == pytest.approx(4.0)
    assert tiny.embedding_dim == 16  # 16x0e scalars of the last layer
    assert tiny.trunk_embedding_dim == 16  # 16x0e of the trunk's 16x0e+16x1o
    assert tiny.energy_is_mp2020_corrected is False
    feats = tiny.trunk([tiny.build_graph(small_cathode_structures()[0])])[0]
    assert set(feats) == {"node_feats", "species", "edge_index", "edge_vectors", "head", "e_frozen"}
    assert feats["node_feats"].shape == (4, 64)  # 16x0e + 16x1o
    assert feats["e_frozen"].dtype == torch.float64
    lengths = feats["edge_vectors"].norm(dim=-1)
    assert float(lengths.max()) <= 4.0 and float(lengths.min()) > 1.0  # Angstrom


def test_load_backbone_dispatches_local_file(tiny_path: Path) -> None:
    bb = load_backbone(f"mace:{tiny_path}")
    assert isinstance(bb, MaceBackbone)


def test_sha256_checked_before_unpickling(tiny_path: Path) -> None:
    with pytest.raises(WeightsMismatchError):
        MaceBackbone.from_spec(f"mace:{tiny_path}", expected_sha256="0" * 64)
    bb = MaceBackbone.from_spec(f"mace:{tiny_path}", expected_sha256=sha256_file(tiny_path))
    assert bb.weights_sha256 == sha256_file(tiny_path)


def test_rejects_non_mace_module_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "linear.model"
    torch.save(torch.nn.Linear(2, 2), path)
    with pytest.raises(TypeError, match="ScaleShiftMACE"):
        MaceBackbone.from_spec(f"mace:{path}")
    with pytest.raises(FileNotFoundError):
        MaceBackbone.from_spec(f"mace:{tmp_path / 'nope.model'}")


def test_uncovered_element_is_a_clear_error(tiny: MaceBackbone) -> None:
    s = Structure(Lattice.cubic(3.0), ["Li", "Pu"], [[0, 0, 0], [0.5, 0.5, 0.5]])  # Z=94 > 89
    with pytest.raises(ValueError, match="Pu"):
        tiny.build_graph(s)


def test_foundation_names() -> None:
    assert foundation_key("mace-mp-0-medium") == "medium"
    assert foundation_key("mace-mpa-0-medium") == "medium-mpa-0"
    assert foundation_key("mace-mp:large") == "large"
    with pytest.raises(ValueError, match="mace:PATH"):
        foundation_key("mace-mp-9-huge")


def _assert_unavailable_message(exc: BackboneUnavailableError) -> None:
    msg = str(exc)
    assert "--backbone chgnet" in msg and "--backbone mace:PATH" in msg
    assert "mace-mp-0-medium" in msg


def test_download_failure_is_backbone_unavailable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Hermetic: urllib fails as it does offline; nothing is written to the real cache."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    with pytest.raises(BackboneUnavailableError) as info:
        load_backbone("mace-mp-0-medium")
    _assert_unavailable_message(info.value)
    assert not list((tmp_path / "mace").glob("*.model"))


def _online(host: str = "github.com", timeout: float = 2.0) -> bool:
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def test_real_download_fails_fast_offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Real mace download code with no network: fails within seconds (skipped when online)."""
    if _online():
        pytest.skip("network reachable: would download MACE-MP-0")
    from mace.calculators import foundations_models as fm

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    # mace's own per-socket timeout is 120 s; cap it in case packets are silently dropped
    monkeypatch.setattr(fm, "_urlretrieve_with_timeout", functools.partial(fm._urlretrieve_with_timeout, timeout=5.0))
    t0 = time.perf_counter()
    with pytest.raises(BackboneUnavailableError) as info:
        MaceBackbone.from_spec("mace-mp-0-medium")
    assert time.perf_counter() - t0 < 30.0
    _assert_unavailable_message(info.value)


def test_corrupt_cached_model_is_backbone_unavailable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import cathode_ray.model.backbones.mace as mace_mod

    bad = tmp_path / "2023-12-03-mace-128-L1_epoch-199.model"
    bad.write_text("<html>rate limited</html>")
    monkeypatch.setattr(mace_mod, "download_foundation", lambda spec: bad)
    with pytest.raises(BackboneUnavailableError, match="--backbone mace:PATH"):
        MaceBackbone.from_spec("mace-mp-0-medium")


def test_structure_roundtrip_energy_is_extensive_consistent(tiny: MaceBackbone) -> None:
    """A 2x supercell has the same energy per atom as its unit cell (eV/atom)."""
    s = Structure(Lattice.cubic(4.61), ["Li", "Li", "O"], [[0.25, 0.25, 0.25], [0.75, 0.75, 0.75], [0, 0, 0]])
    e = tiny.reference_energy([s, s * (2, 1, 1)])
    assert float((e[0] - e[1]).abs()) < 1e-5


def test_cueq_switch_falls_back_to_e3nn(tiny_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Asking for cuEquivariance without the package keeps e3nn kernels and the same energies."""
    from cathode_ray.model.backbones.mace import cueq_available

    if cueq_available():
        pytest.skip("cuequivariance_torch is installed here; the fallback path is not taken")
    plain = MaceBackbone.from_spec(f"mace:{tiny_path}")
    with caplog.at_level("WARNING"):
        switched = MaceBackbone.from_spec(f"mace:{tiny_path}", enable_cueq=True)
    assert "cuequivariance_torch is not installed" in caplog.text
    structures = small_cathode_structures()[:2]
    torch.testing.assert_close(switched.reference_energy(structures), plain.reference_energy(structures))
