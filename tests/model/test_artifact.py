"""Model directory: manifest hashes, tamper refusal, weights-only loading, backbone identity."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cathode_ray.model.artifact import ArtifactIntegrityError, ModelDir
from cathode_ray.model.ensemble import Ensemble
from cathode_ray.model.head import HeadConfig
from cathode_ray.model.member import Member, Normalizer, ThermoInputs
from tests.chgnet_data import chgnet, member_data


def _write_model(root: Path, n_members: int = 2, *, head_only: bool = False) -> ModelDir:
    bb = chgnet()
    norm = Normalizer(mean=0.08, std=0.05)
    md = ModelDir(uri=str(root))
    names = []
    for i in range(n_members):
        torch.manual_seed(i)
        m = Member.create(bb, HeadConfig(), norm)
        md.write_tensors(f"member_{i}.pt", m.trainable_state())
        names.append(f"member_{i}.pt")
    md.write_bytes("normalizer.json", norm.to_json().encode())
    md.write_manifest({
        "backbone": {**bb.identity(), "spec": "chgnet"},
        "config": {"head": {"mode": "delta", "hidden": 128, "dropout": 0.1},
                   "train_last_block": not head_only},
        "members": [{"index": i, "file": f"member_{i}.pt", "seed": 42 + i} for i in range(n_members)],
        "data_version": {}, "file_names": [*names, "normalizer.json"],
    })
    return md


@pytest.mark.parametrize("head_only", [False, True])
def test_round_trip_and_shared_trunk_equals_separate_members(tmp_path: Path, head_only: bool) -> None:
    md = _write_model(tmp_path / "m", head_only=head_only)
    ens = Ensemble.load(md.uri, backbone=chgnet())
    assert ens.shared_last_block is head_only
    data = member_data(6, seed=3)
    th = ThermoInputs(hull_pa=data.hull_pa, corr_pa=data.corr_pa, has_ref=data.has_ref)
    pred = ens.predict_feats(data.feats, th)
    assert pred.q50.shape == (2, 6) and pred.embedding.shape == (6, 64)
    batch = chgnet().collate(data.feats)
    for i, member in enumerate(ens.members):  # each member alone on the same batch
        with torch.no_grad():
            alone = member(batch, th)["q50"].numpy()
        np.testing.assert_allclose(pred.q50[i], alone, atol=1e-6)


@pytest.mark.parametrize("victim", ["member_1.pt", "normalizer.json"])
def test_tampered_file_is_refused(tmp_path: Path, victim: str) -> None:
    md = _write_model(tmp_path / "m")
    path = tmp_path / "m" / victim
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactIntegrityError, match="sha256"):
        Ensemble.load(md.uri, backbone=chgnet())


def test_missing_file_and_edited_manifest_are_refused(tmp_path: Path) -> None:
    md = _write_model(tmp_path / "m")
    manifest = json.loads((tmp_path / "m" / "manifest.json").read_text())
    manifest["files"]["member_0.pt"]["size"] += 1
    (tmp_path / "m" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactIntegrityError, match="model_id"):
        Ensemble.load(md.uri, backbone=chgnet())
    md = _write_model(tmp_path / "n")
    (tmp_path / "n" / "member_0.pt").unlink()
    with pytest.raises(ArtifactIntegrityError, match="cannot read"):
        Ensemble.load(md.uri, backbone=chgnet())


def test_pickled_code_is_never_loaded(tmp_path: Path) -> None:
    """A member file holding a pickled object (not tensors) fails weights_only loading."""

    class Evil:
        def __reduce__(self):  # pragma: no cover - must never run
            return (print, ("pwned",))

    buf = io.BytesIO()
    torch.save({"x": Evil()}, buf)
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        ModelDir.load_tensors(buf.getvalue())


def test_backbone_mismatch_is_refused(tmp_path: Path) -> None:
    md = _write_model(tmp_path / "m")
    manifest = md.read_manifest()
    manifest["backbone"]["weights_sha256"] = "0" * 64
    manifest["file_names"] = list(manifest["files"])
    md.write_manifest(manifest)
    with pytest.raises(ArtifactIntegrityError, match="trained on backbone"):
        Ensemble.load(md.uri, backbone=chgnet())
