"""Fixtures for the screening tests: a small real trained model, a local Ray, a moto S3 server."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.ports import free_port, moto_server_command
from tests.screen.tiny_model import REFERENCES, build_tiny_model, shared_data_missing

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def references() -> str:
    """``snapshot:`` reference source of the shared MP entries (skips without shared data)."""
    if (msg := shared_data_missing()) is not None:
        pytest.skip(msg)
    return f"snapshot:{REFERENCES}"


@pytest.fixture(scope="session")
def tiny_model(references: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A trained + calibrated 2-member CHGNet ensemble (~1-2 min to build).

    Cached across sessions in $CATHODE_RAY_TEST_CACHE (default /tmp/cathode_ray_test_cache),
    keyed by the source of the builder and of cathode_ray's model/train/calibrate/data code, so repeated local runs skip training.
    """
    h = hashlib.sha256()
    for src in sorted([REPO / "tests/screen/tiny_model.py",
                       *(REPO / "cathode_ray").glob("[mtcd]*/**/*.py")]):
        h.update(src.read_bytes())
    key = h.hexdigest()[:12]
    cache = Path(os.environ.get("CATHODE_RAY_TEST_CACHE", "/tmp/cathode_ray_test_cache"))
    model = cache / f"model-{key}" / "model"
    if (model / "manifest.json").is_file():
        return model
    work = tmp_path_factory.mktemp("tiny_model")
    built = build_tiny_model(work)
    model.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(model, ignore_errors=True)
    shutil.copytree(built, model)
    return model


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    """A private 2-CPU local Ray for the module (workers import the repo via PYTHONPATH).

    Request it *after* ``s3_server`` so workers inherit the AWS_* test credentials (an unsigned
    S3 client in a worker would upload aws-chunked bodies that moto stores verbatim).
    """
    import ray

    if ray.is_initialized():
        ray.shutdown()
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), old) if p)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield None
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def s3_server() -> Iterator[str]:
    """A moto S3 server on a free port with bucket ``screen``; AWS_* env points at it."""
    import boto3

    port = free_port()
    proc = subprocess.Popen(moto_server_command(port), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    env = {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        for _ in range(100):
            try:
                boto3.client("s3", endpoint_url=url).create_bucket(Bucket="screen")
                break
            except Exception:  # noqa: BLE001 - server still starting
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
