"""Model directory: manifest hashes, tamper refusal, weights-only loading, backbone identity."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from cathode_ray.model.artifact import FORMAT_VERSION, ArtifactIntegrityError, ModelDir
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


@pytest.mark.parametrize("edit", ["drop members", "head", "train_last_block", "backbone spec", "new key"])
def test_edited_manifest_settings_change_model_id_and_are_refused(tmp_path: Path, edit: str) -> None:
    """model_id covers the whole manifest, not only its file table: settings the loader reads
    cannot be edited under the same id (before: all of these passed verify=True)."""
    md = _write_model(tmp_path / "m", n_members=3)
    path = tmp_path / "m" / "manifest.json"
    manifest = json.loads(path.read_text())
    if edit == "drop members":
        manifest["members"] = manifest["members"][:1]
    elif edit == "head":
        manifest["config"]["head"]["hidden"] = 64
    elif edit == "train_last_block":
        manifest["config"]["train_last_block"] = not manifest["config"]["train_last_block"]
    elif edit == "backbone spec":
        manifest["backbone"]["spec"] = "mace-mp-0-medium"
    else:
        manifest["extra"] = 1
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    with pytest.raises(ArtifactIntegrityError, match="does not match model_id"):
        md.read_manifest(verify=True)
    with pytest.raises(ArtifactIntegrityError, match="does not match model_id"):
        Ensemble.load(md.uri, backbone=chgnet())


def test_model_id_ignores_only_volatile_fields(tmp_path: Path) -> None:
    """Re-writing the same model (a later written_at, another git commit) keeps its model_id;
    key order and JSON layout do not matter."""
    md = _write_model(tmp_path / "m")
    first = md.read_manifest()
    again = md.write_manifest({**first, "git_commit": "f" * 40, "written_at": "2000-01-01",
                               "file_names": list(first["files"])})
    assert again["model_id"] == first["model_id"] and again["format_version"] == FORMAT_VERSION
    path = tmp_path / "m" / "manifest.json"
    path.write_text(json.dumps(dict(reversed(list(again.items())))))  # other order, no indent
    assert md.read_manifest(verify=True)["model_id"] == first["model_id"]


def test_member_file_missing_from_the_file_table_is_refused(tmp_path: Path) -> None:
    """A member whose file the table does not list: ArtifactIntegrityError (before: KeyError in
    Ensemble.load), even when the manifest was re-hashed consistently."""
    md = _write_model(tmp_path / "m")
    manifest = md.read_manifest()
    manifest["file_names"] = [n for n in manifest["files"] if n != "member_1.pt"]
    md.write_manifest(manifest)  # a self-consistent manifest whose table lacks member_1.pt
    with pytest.raises(ArtifactIntegrityError, match="not in the manifest's file table"):
        Ensemble.load(md.uri, backbone=chgnet())


def test_format_1_manifest_is_refused_with_the_upgrade_and_upgrades(tmp_path: Path) -> None:
    """A model written before model_id covered the whole manifest: a clear error naming the
    upgrade; upgrade_manifest checks the files against the old table, then re-writes it."""
    md = _write_model(tmp_path / "m")
    path = tmp_path / "m" / "manifest.json"
    current = json.loads(path.read_text())
    old = {**current, "format_version": 1,
           "model_id": hashlib.sha256(json.dumps(current["files"], sort_keys=True).encode()).hexdigest()}
    path.write_text(json.dumps(old, indent=2, sort_keys=True))
    for verify in (True, False):
        with pytest.raises(ArtifactIntegrityError, match=r"format 1 .*upgrade_manifest\(\)"):
            md.read_manifest(verify=verify)
    bad = tmp_path / "bad"
    shutil.copytree(tmp_path / "m", bad)
    (bad / "member_0.pt").write_bytes(b"changed")
    with pytest.raises(ArtifactIntegrityError, match="sha256/size"):  # no upgrade of changed files
        ModelDir(uri=str(bad)).upgrade_manifest()
    upgraded = md.upgrade_manifest()
    assert upgraded["format_version"] == FORMAT_VERSION and upgraded["model_id"] == current["model_id"]
    assert md.upgrade_manifest()["model_id"] == current["model_id"]  # current format: unchanged
    assert len(Ensemble.load(md.uri, backbone=chgnet()).members) == 2


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


def test_add_files_does_not_re_approve_a_file_changed_behind_the_manifest(tmp_path: Path) -> None:
    md = _write_model(tmp_path / "m")
    md.write_bytes("normalizer.json", Normalizer(mean=0.58, std=0.05).to_json().encode())
    with pytest.raises(ArtifactIntegrityError, match="normalizer.json: sha256/size"):
        md.add_files(["triage.json"])
    md.write_bytes("normalizer.json", Normalizer(mean=0.08, std=0.05).to_json().encode())  # restored
    md.write_bytes("triage.json", b"{}")
    md.add_files(["triage.json", "normalizer.json"])  # the files named are (re-)hashed
    assert "triage.json" in md.read_manifest()["files"]


def test_a_mace_backbone_is_checked_against_the_manifest_before_it_is_unpickled(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cathode_ray.model.backbones import mace as mace_module
    from cathode_ray.model.backbones.mace import WeightsMismatchError
    from cathode_ray.testing.tiny_mace import build_tiny_mace

    tiny = build_tiny_mace(tmp_path / "tiny.model", r_max=4.0, seed=0)
    md = _write_model(tmp_path / "m")
    manifest = md.read_manifest()
    manifest["backbone"] = {**manifest["backbone"], "spec": f"mace:{tiny}", "weights_sha256": "0" * 64}
    manifest["file_names"] = list(manifest["files"])
    md.write_manifest(manifest)
    unpickled: list[object] = []
    monkeypatch.setattr(mace_module.torch, "load", lambda *a, **k: unpickled.append(a))
    with pytest.raises(WeightsMismatchError, match="not loaded"):
        Ensemble.load(md.uri)
    assert not unpickled
