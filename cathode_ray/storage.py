"""Filesystems for local paths and ``s3://`` URIs (pyarrow), shared by every stage.

S3 credentials and endpoint come from the standard AWS environment variables; a local S3 server
(e.g. moto) is reached through ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``).
"""

from __future__ import annotations

import os
import re
from typing import Any
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq


def s3_filesystem() -> pafs.S3FileSystem:
    """S3FileSystem from the standard AWS environment; ``AWS_ENDPOINT_URL`` (or
    ``AWS_ENDPOINT_URL_S3``, e.g. a MinIO or moto server) overrides the endpoint."""
    kwargs: dict[str, object] = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        url = urlparse(endpoint)
        if url.scheme:
            kwargs["scheme"] = url.scheme
            kwargs["endpoint_override"] = url.netloc
        else:
            kwargs["endpoint_override"] = endpoint
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    return pafs.S3FileSystem(**kwargs)


def s3_client() -> Any:
    """boto3 S3 client for conditional writes pyarrow cannot express (If-None-Match / If-Match);
    endpoint from ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` like :func:`s3_filesystem`."""
    import boto3

    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return boto3.client("s3", endpoint_url=endpoint or None)


def s3_path(uri: str) -> str | None:
    """``bucket/key`` of an ``s3://bucket/key`` URI, else None; builds no filesystem (an
    S3FileSystem takes ~0.6 ms to make, a minute for the labels of 100,000 library files)."""
    parsed = urlparse(uri)
    return f"{parsed.netloc}{parsed.path}".rstrip("/") if parsed.scheme == "s3" else None


_SNAPSHOT_HINT = (" ('snapshot:' marks MP-document sources: --source, --references, --from; "
                  "a --library takes the path itself)")
#: ``scheme://`` at the start of a location: only this makes it a URI. A ':' alone does not
#: (``out:v2/screen`` is a relative directory, ``C:\\data`` a Windows path).
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def filesystem_for(uri: str) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, path inside it)`` for a local path (relative paths are made absolute),
    an ``s3://bucket/key`` URI, or another pyarrow URI (``file://`` ...).

    Only ``scheme://`` marks a URI; a local path may hold ':' anywhere (``out:v2/screen``).
    ``snapshot:PATH`` is refused with a hint: it names MP documents, never a location.
    """
    parsed = urlparse(uri)
    if not _URI.match(uri):
        if parsed.scheme == "snapshot":
            raise ValueError(f"{uri!r}: cannot read 'snapshot:' locations; give a local path or "
                             f"s3://bucket/key{_SNAPSHOT_HINT}")
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri)).rstrip("/") or "/"
    if (key := s3_path(uri)) is not None:
        return s3_filesystem(), key
    try:
        return pafs.FileSystem.from_uri(uri)
    except pa.ArrowInvalid as exc:  # e.g. "Unrecognized filesystem type in URI"
        hint = _SNAPSHOT_HINT if parsed.scheme == "snapshot" else ""
        raise ValueError(f"{uri!r}: cannot read '{parsed.scheme}:' locations; give a local "
                         f"path or s3://bucket/key{hint}") from exc


IN_PROGRESS_SUFFIX = ".in-progress"


def write_parquet(table: pa.Table, fs: pafs.FileSystem, path: str) -> None:
    """Write ``table`` to ``path`` so that no reader ever sees a partial file.

    On a local filesystem the file is written as ``.<name>.in-progress`` beside ``path`` and then
    renamed (atomic), so a process killed mid-write leaves only a hidden temporary that readers
    skip (pyarrow and Ray ignore names starting with '.') and a resume deletes. An object store
    (S3) makes the object visible only when its upload completes, so it is written in place.
    """
    parent, name = path.rsplit("/", 1)
    fs.create_dir(parent, recursive=True)
    if fs.type_name != "local":
        pq.write_table(table, path, filesystem=fs, compression="zstd")
        return
    tmp = f"{parent}/.{name}{IN_PROGRESS_SUFFIX}"
    pq.write_table(table, tmp, filesystem=fs, compression="zstd")
    fs.move(tmp, path)


def check_dest(uri: str, what: str = "out") -> None:
    """Refuse an output location that is neither local (a path, ``file://``) nor ``s3://``.

    pyarrow would write Parquet to ``gs://`` or ``hdfs://``, but the run lock, the manifests
    and the re-screen state only know local disk and S3: elsewhere the lock would be a local,
    cwd-relative file that does not keep two hosts out of one run.

    Raises:
        ValueError: another scheme.
    """
    scheme = urlparse(uri).scheme.lower()
    if len(scheme) > 1 and scheme not in ("s3", "file"):  # one letter: a Windows drive
        raise ValueError(f"{what} {uri!r}: outputs go to a local path or s3://bucket/prefix, not "
                         f"{scheme}://; the run lock and manifests need one of those")


def is_remote(uri: str) -> bool:
    """True for an ``s3://`` URI (any case of the scheme, as :func:`filesystem_for` reads it)."""
    return uri[:5].lower() == "s3://"


def join(uri: str, *parts: str) -> str:
    """Join URI parts with '/' (works for local paths and s3://)."""
    out = uri.rstrip("/")
    for p in parts:
        out = f"{out}/{p.strip('/')}"
    return out
