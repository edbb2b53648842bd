"""Versioned model directory with a JSON manifest; every file hash-verified before loading.

Layout of ``MODEL_DIR`` (local path or ``s3://bucket/prefix``)::

    manifest.json           format version, backbone identity, data version, config, members,
                            git commit, and sha256 + size of every other file
    member_0.pt ...         trainable tensors only (last block + head), torch.save of a dict of
                            tensors, loaded with ``weights_only=True``
    normalizer.json         E_hull standardisation fitted on train
    conformal_params.json   + OOD files, written by calibration (absent before)
    soap_clusterer.json     SOAP cluster model, to assign clusters to new structures

``model_id`` is the sha256 of the manifest's file table, so any change to any file changes it.
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

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class ArtifactIntegrityError(RuntimeError):
    """A model file is missing, changed, or not listed in the manifest."""


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """pyarrow filesystem and path for a local path or ``s3://`` URI (AWS env vars, incl.
    ``AWS_ENDPOINT_URL`` for a local S3 server)."""
    from cathode_ray.storage import filesystem_for

    return filesystem_for(uri)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


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
        """Hash every listed file, add the file table and model_id, write manifest.json."""
        files = {}
        for name in sorted(manifest.get("file_names", [])):
            data = self.read_bytes(name)
            files[name] = {"sha256": sha256_bytes(data), "size": len(data)}
        table = json.dumps(files, sort_keys=True).encode()
        out = {k: v for k, v in manifest.items() if k != "file_names"}
        out.update(format_version=FORMAT_VERSION, files=files, model_id=sha256_bytes(table),
                   written_at=datetime.now(UTC).isoformat(timespec="seconds"))
        self.write_bytes(MANIFEST, json.dumps(out, indent=2, sort_keys=True).encode())
        return out

    def add_files(self, names: list[str]) -> dict[str, Any]:
        """Add (or re-hash) files in an existing manifest, e.g. after calibration."""
        manifest = self.read_manifest(verify=False)
        listed = set(manifest["files"]) | set(names)
        manifest["file_names"] = sorted(listed)
        return self.write_manifest(manifest)

    def read_manifest(self, *, verify: bool = True) -> dict[str, Any]:
        try:
            manifest = json.loads(self.read_bytes(MANIFEST))
        except json.JSONDecodeError as e:
            raise ArtifactIntegrityError(f"{self.uri}/{MANIFEST} is not valid JSON: {e}") from e
        if manifest.get("format_version") != FORMAT_VERSION:
            raise ArtifactIntegrityError(
                f"{self.uri}: manifest format {manifest.get('format_version')} is not {FORMAT_VERSION}"
            )
        if verify:
            self.verify(manifest)
        return manifest

    def verify(self, manifest: dict[str, Any]) -> dict[str, bytes]:
        """Check every file's size and sha256 against the manifest; return the verified bytes."""
        table = json.dumps(manifest["files"], sort_keys=True).encode()
        if sha256_bytes(table) != manifest.get("model_id"):
            raise ArtifactIntegrityError(f"{self.uri}: manifest file table does not match model_id")
        verified = {}
        for name, meta in manifest["files"].items():
            data = self.read_bytes(name)
            if len(data) != meta["size"] or sha256_bytes(data) != meta["sha256"]:
                raise ArtifactIntegrityError(
                    f"{self.uri}/{name}: sha256/size does not match the manifest — the file was "
                    "changed or corrupted; refusing to load it. Re-download or re-train the model."
                )
            verified[name] = data
        return verified
