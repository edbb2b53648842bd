"""Filesystems for local paths and ``s3://`` URIs (pyarrow), shared by every stage.

S3 credentials and endpoint come from the standard AWS environment variables; a local S3 server
(e.g. moto) is reached through ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``).
"""

from __future__ import annotations

import os
from urllib.parse import urlparse

import pyarrow.fs as pafs


def s3_filesystem() -> pafs.S3FileSystem:
    """S3FileSystem from the environment (endpoint override when AWS_ENDPOINT_URL is set)."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    kwargs: dict[str, object] = {"region": os.environ.get("AWS_DEFAULT_REGION", "us-east-1")}
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs["endpoint_override"] = parsed.netloc or parsed.path
        kwargs["scheme"] = parsed.scheme or "http"
    return pafs.S3FileSystem(**kwargs)


def filesystem_for(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for a local path or an ``s3://bucket/key`` URI."""
    if uri.startswith("s3://"):
        return s3_filesystem(), uri[len("s3://"):].rstrip("/")
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri)).rstrip("/") or "/"


def is_remote(uri: str) -> bool:
    return uri.startswith("s3://")


def join(uri: str, *parts: str) -> str:
    """Join URI parts with '/' (works for local paths and s3://)."""
    out = uri.rstrip("/")
    for p in parts:
        out = f"{out}/{p.strip('/')}"
    return out
