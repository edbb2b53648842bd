"""Versioned model directory with a JSON manifest; every file hash-verified before loading.

Layout of ``MODEL_DIR`` (local path or ``s3://bucket/prefix``)::

    manifest.json           format version, backbone identity, data version, config, members,
                            git commit, and sha256 + size of every other file
    member_0.pt ...         trainable tensors only (last block + head), torch.save of a dict of
                            tensors, loaded with ``weights_only=True``
    normalizer.json         E_hull standardisation fitted on train
    conformal_params.json   + OOD files, written by calibration (absent before)
    soap_clusterer.json     SOAP cluster model, to assign clusters to new structures

``model_id`` is the sha256 of the whole manifest (canonical JSON: sorted keys, no whitespace)
less :data:`UNHASHED` (``model_id`` itself, ``written_at``, ``git_commit``). The file table is
part of it, so any change to any file, or to any setting the loader reads (``members``,
``config``, ``backbone``, ...), changes it. Format 1 manifests hashed the file table only; they
are refused with the way to re-write them (:meth:`ModelDir.upgrade_manifest`).
"""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import torch

#: 2: ``model_id`` covers the whole manifest (1: the file table only).
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
#: Manifest fields outside ``model_id``: the id itself, and provenance that names when and from
#: which source commit the manifest was written, not what the model is.
UNHASHED = frozenset({"model_id", "written_at", "git_commit"})


class ArtifactIntegrityError(RuntimeError):
    """A model file is missing, changed, or not listed in the manifest."""


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """pyarrow filesystem and path for a local path or ``s3://`` URI (AWS env vars, incl.
    ``AWS_ENDPOINT_URL`` for a local S3 server)."""
    from cathode_ray.storage import filesystem_for

    return filesystem_for(uri)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def manifest_id(manifest: dict[str, Any]) -> str:
    """``model_id`` of a manifest: sha256 of its canonical JSON (sorted keys, compact separators)
    without the :data:`UNHASHED` fields."""
    body = {k: v for k, v in manifest.items() if k not in UNHASHED}
    return sha256_bytes(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())


def git_commit(cwd: str | Path | None = None) -> str | None:
    """Current git commit of the source tree, or None outside a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd or Path(__file__).parent,
                             capture_output=True, text=True, timeout=5, check=True)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


@dataclass(frozen=True, kw_only=True)
class ModelDir:
    """Read/write access to one model directory (local or S3)."""

    uri: str

    def _fs(self) -> tuple[pafs.FileSystem, str]:
        return filesystem(self.uri)

    def write_bytes(self, name: str, data: bytes) -> None:
        fs, root = self._fs()
        fs.create_dir(root, recursive=True)
        with fs.open_output_stream(f"{root}/{name}") as f:
            f.write(data)

    def read_bytes(self, name: str) -> bytes:
        fs, root = self._fs()
        try:
            with fs.open_input_stream(f"{root}/{name}") as f:
                return f.read()
        except (FileNotFoundError, OSError) as e:
            raise ArtifactIntegrityError(f"{self.uri}: cannot read {name}: {e}") from e

    def exists(self, name: str) -> bool:
        fs, root = self._fs()
        return fs.get_file_info(f"{root}/{name}").type == pafs.FileType.File

    # -- tensors ---------------------------------------------------------------------------
    def write_tensors(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        buf = io.BytesIO()
        torch.save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, buf)
        self.write_bytes(name, buf.getvalue())

    @staticmethod
    def load_tensors(data: bytes) -> dict[str, torch.Tensor]:
        """Tensors from verified bytes; never unpickles code (weights_only=True, explicitly,
        because importing mace sets TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 process-wide)."""
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise ArtifactIntegrityError("member file does not hold a flat dict of tensors")
        return obj

    # -- manifest --------------------------------------------------------------------------
    def write_manifest(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """Hash every file in ``file_names``, add the file table, format version and model_id
        (over the whole manifest, :func:`manifest_id`), write manifest.json."""
        files = {}
        for name in sorted(manifest.get("file_names", [])):
            data = self.read_bytes(name)
            files[name] = {"sha256": sha256_bytes(data), "size": len(data)}
        derived = {"file_names", "files", "format_version", "model_id", "written_at"}
        out = {k: v for k, v in manifest.items() if k not in derived}
        out.update(format_version=FORMAT_VERSION, files=files)
        out.update(model_id=manifest_id(out), written_at=datetime.now(UTC).isoformat(timespec="seconds"))
        self.write_bytes(MANIFEST, json.dumps(out, indent=2, sort_keys=True).encode())
        return out

    def add_files(self, names: list[str]) -> dict[str, Any]:
        """Add (or re-hash) the files ``names`` in an existing manifest, e.g. after calibration.

        Raises:
            ArtifactIntegrityError: a file not in ``names`` changed since the manifest was
                written; it is not re-approved under a new model_id.
        """
        manifest = self.read_manifest(verify=False)
        self._verify_files({k: v for k, v in manifest["files"].items() if k not in set(names)})
        listed = set(manifest["files"]) | set(names)
        manifest["file_names"] = sorted(listed)
        return self.write_manifest(manifest)

    def _load_manifest(self) -> dict[str, Any]:
        """manifest.json as a dict, whatever its format version."""
        try:
            manifest = json.loads(self.read_bytes(MANIFEST))
        except json.JSONDecodeError as e:
            raise ArtifactIntegrityError(f"{self.uri}/{MANIFEST} is not valid JSON: {e}") from e
        if not isinstance(manifest, dict):
            raise ArtifactIntegrityError(f"{self.uri}/{MANIFEST} is not a JSON object")
        return manifest

    def read_manifest(self, *, verify: bool = True) -> dict[str, Any]:
        """The manifest (format :data:`FORMAT_VERSION` only); ``verify``: also check every file."""
        manifest = self._load_manifest()
        version = manifest.get("format_version")
        if version == 1:
            raise ArtifactIntegrityError(
                f"{self.uri}: manifest format 1 hashes only its file table, so its settings "
                f"(members, config, backbone) are unverified; re-write it in format {FORMAT_VERSION} "
                "after checking them: python -c \"from cathode_ray.model.artifact import ModelDir; "
                f"ModelDir(uri={self.uri!r}).upgrade_manifest()\""
            )
        if version != FORMAT_VERSION:
            raise ArtifactIntegrityError(
                f"{self.uri}: manifest format {version} is not {FORMAT_VERSION}"
            )
        if verify:
            self.verify(manifest)
        return manifest

    def upgrade_manifest(self) -> dict[str, Any]:
        """Re-write a format-1 manifest in the current format (a current one is only verified).

        The files are first checked against the format-1 file table and its model_id, so only
        the settings that format left unhashed are taken on trust: check them before upgrading.
        The model_id changes. Returns the manifest as written.
        """
        manifest = self._load_manifest()
        if manifest.get("format_version") != 1:
            return self.read_manifest(verify=True)
        files = manifest.get("files")
        if not isinstance(files, dict):
            raise ArtifactIntegrityError(f"{self.uri}: manifest has no file table")
        table = json.dumps(files, sort_keys=True).encode()
        if sha256_bytes(table) != manifest.get("model_id"):
            raise ArtifactIntegrityError(f"{self.uri}: manifest file table does not match model_id")
        self._verify_files(files)
        kept = {k: v for k, v in manifest.items() if k not in {"files", "format_version"}}
        return self.write_manifest({**kept, "file_names": sorted(files)})

    def verify(self, manifest: dict[str, Any]) -> dict[str, bytes]:
        """Check model_id against the whole manifest, that every member's file is listed, and
        every file's size and sha256; return the verified bytes."""
        if manifest_id(manifest) != manifest.get("model_id"):
            raise ArtifactIntegrityError(
                f"{self.uri}: manifest does not match model_id — manifest.json was edited or "
                "corrupted; refusing to load it. Re-download or re-train the model."
            )
        files = manifest.get("files")
        if not isinstance(files, dict):
            raise ArtifactIntegrityError(f"{self.uri}: manifest has no file table")
        for member in manifest.get("members", []):
            name = member.get("file") if isinstance(member, dict) else None
            if name not in files:
                raise ArtifactIntegrityError(
                    f"{self.uri}: member {member!r} names a file that is not in the manifest's "
                    "file table; refusing to load it."
                )
        return self._verify_files(files)

    def _verify_files(self, files: dict[str, Any]) -> dict[str, bytes]:
        """Read every file of a file table and check its size and sha256; the verified bytes."""
        verified = {}
        for name, meta in files.items():
            data = self.read_bytes(name)
            if (not isinstance(meta, dict) or len(data) != meta.get("size")
                    or sha256_bytes(data) != meta.get("sha256")):
                raise ArtifactIntegrityError(
                    f"{self.uri}/{name}: sha256/size does not match the manifest — the file was "
                    "changed or corrupted; refusing to load it. Re-download or re-train the model."
                )
            verified[name] = data
        return verified
