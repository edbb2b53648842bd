"""Shared helpers of the reliability tests: libraries, Ray, a moto S3 server, a TCP proxy that can
drop the S3 connection, and output readers/comparisons.

Everything started here is stopped by its own pid / handle, never by name.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from tests.ports import free_port, moto_server_command

REPO: Path = Path(__file__).resolve().parents[2]
#: ../shared/data next to the repository (real MP snapshot files; never copied into the repo).
SHARED_DATA: Path = REPO.parent / "shared" / "data"
REFERENCES_FILE: Path = SHARED_DATA / "mp_reference_entries.jsonl.gz"
SUMMARY_FILE: Path = SHARED_DATA / "mp_litmo_summary.jsonl.gz"
#: The calibrated model shipped with the repository (5 head-only CHGNet members).
BUNDLED_MODEL: Path = REPO / "artifacts" / "models" / "chgnet-litmo-v1"

#: Float columns compared between an interrupted and a clean run (eV/atom or probabilities).
FLOAT_COLUMNS: tuple[str, ...] = ("e_hull_pred", "e_hull_lo", "e_hull_hi", "q10", "q90",
                                  "epistemic_std", "aleatoric_width", "p_stable", "p_metastable",
                                  "ood_score")
#: Columns that must be equal exactly between an interrupted and a clean run.
EXACT_COLUMNS: tuple[str, ...] = ("formula", "chemsys", "nsites", "decision", "ood_gates",
                                  "soap_cluster", "has_reference", "model_id")


def missing_data_message() -> str | None:
    """A skip message when the shared MP snapshot or the bundled model is absent, else None."""
    missing = [str(p) for p in (SUMMARY_FILE, REFERENCES_FILE, BUNDLED_MODEL / "manifest.json")
               if not p.is_file()]
    if missing:
        return (f"reliability tests need {missing}: place the MP snapshot files in ../shared/data "
                "(next to the repository) and keep artifacts/models/chgnet-litmo-v1")
    return None


# --------------------------------------------------------------------------- libraries
def good_docs(n: int) -> list[dict[str, Any]]:
    """The first ``n`` real MP summary documents with at most 16 sites (deterministic)."""
    from tests.screen.tiny_model import small_docs

    return small_docs(n)


def write_good_library(directory: Path, n: int = 40, files: int = 2) -> list[str]:
    """``n`` real MP structures split over ``files`` JSON-lines files; returns their ids."""
    directory.mkdir(parents=True, exist_ok=True)
    docs = good_docs(n)
    per = -(-len(docs) // files)
    for k in range(files):
        chunk = docs[k * per:(k + 1) * per]
        (directory / f"good_{k}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in chunk))
    return [str(d["material_id"]) for d in docs]


# --------------------------------------------------------------------------- ray
@contextmanager
def local_ray(extra_pythonpath: tuple[str, ...] = (), num_cpus: int = 2) -> Iterator[str]:
    """A private local Ray with ``num_cpus`` logical CPUs (workers import the repo via
    PYTHONPATH); yields its GCS address.

    Start it *after* setting AWS_* variables: workers inherit the environment at start.
    """
    import ray

    if ray.is_initialized():
        ray.shutdown()
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), *extra_pythonpath, old) if p)
    ctx = ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    try:
        yield str(ctx.address_info["gcs_address"])
    finally:
        ray.shutdown()
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old


def ray_session_dir() -> Path | None:
    """The running local Ray's session directory (logs), or None."""
    try:
        from ray._private import worker

        node = worker._global_node
        return Path(node.get_session_dir_path()) if node is not None else None
    except Exception:  # noqa: BLE001 - private API; only used to find log files
        return None


# --------------------------------------------------------------------------- S3
@dataclass
class MotoServer:
    """``moto_server`` on 127.0.0.1:``port`` as a subprocess, stopped by its pid.

    moto keeps everything in memory: :meth:`restart` loses every bucket and object.
    """

    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> MotoServer:
        self.proc = subprocess.Popen(moto_server_command(self.port), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"moto_server did not start on port {self.port}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def client(self) -> Any:
        """A boto3 S3 client talking to this server directly."""
        import boto3

        return boto3.client("s3", endpoint_url=self.url, region_name="us-east-1",
                            aws_access_key_id="direct", aws_secret_access_key="direct")

    def create_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        out: list[str] = []
        for page in self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket,
                                                                            Prefix=prefix):
            out += [o["Key"] for o in page.get("Contents", [])]
        return out


@contextmanager
def aws_env(endpoint: str, key_id: str = "testing", secret: str = "testing") -> Iterator[None]:
    """AWS_* variables pointing boto3 / pyarrow at ``endpoint``; restored afterwards."""
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": key_id,
           "AWS_SECRET_ACCESS_KEY": secret, "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield None
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class TcpProxy:
    """A TCP forwarder 127.0.0.1:``port`` -> ``upstream``; :meth:`outage` makes it unreachable.

    During an outage the listening socket is closed and every open connection is cut, so clients
    see connection refused / reset, as when an S3 endpoint goes away; the upstream keeps its data.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = free_port()
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self.outages = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> TcpProxy:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        sock.listen(64)
        self._listener = sock
        threading.Thread(target=self._accept, args=(sock,), daemon=True).start()
        return self

    def _accept(self, sock: socket.socket) -> None:
        while True:
            try:
                client, _ = sock.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self) -> None:
        """Stop listening and reset every open connection."""
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        with self._lock:
            conns, self._conns = self._conns, []
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
                c.close()
            except OSError:
                pass

    def outage(self, seconds: float) -> None:
        """Unreachable for ``seconds``, then listening again on the same port."""
        self.outages += 1
        self.cut()
        time.sleep(seconds)
        self.start()

    def stop(self) -> None:
        self.cut()


# --------------------------------------------------------------------------- outputs
def read_table(uri: str) -> Any:
    """All Parquet files under ``uri`` as one pyarrow table (None when there is none)."""
    from cathode_ray.screen.runs import _parquet_files

    fs, files = _parquet_files(uri)
    if not files:
        return None
    return pq.ParquetDataset(files, filesystem=fs, partitioning=None).read()


def run_output(dest: str, run_id: str) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """``({structure_id: result row}, [reject rows])`` of one run; raises on a duplicate result."""
    from cathode_ray.screen.runs import RunPaths

    paths = RunPaths(dest=dest, run_id=run_id)
    res, rej = read_table(paths.results), read_table(paths.rejects)
    rows = res.to_pylist() if res is not None else []
    results = {r["structure_id"]: r for r in rows}
    assert len(results) == len(rows), f"duplicate result ids in {paths.results}"
    return results, (rej.to_pylist() if rej is not None else [])


def assert_same_output(dest_a: str, run_a: str, dest_b: str, run_b: str,
                       atol: float = 1e-5) -> None:
    """Two runs wrote the same structure ids, rejects and predictions (floats to ``atol``)."""
    res_a, rej_a = run_output(dest_a, run_a)
    res_b, rej_b = run_output(dest_b, run_b)
    assert sorted(res_a) == sorted(res_b), "different result structure ids"
    key = lambda r: (r["structure_id"], r["occurrence"], r["reason"])  # noqa: E731
    assert sorted(map(key, rej_a)) == sorted(map(key, rej_b)), "different rejects"
    assert_same_predictions(res_a, res_b, atol=atol)


def assert_same_predictions(res_a: dict[str, dict[str, Any]], res_b: dict[str, dict[str, Any]],
                            atol: float = 1e-5) -> None:
    """Every result of ``res_a`` is in ``res_b`` with the same values (floats to ``atol``)."""
    for sid, a in res_a.items():
        assert sid in res_b, f"{sid} missing"
        b = res_b[sid]
        for col in EXACT_COLUMNS:
            assert a[col] == b[col], f"{sid}.{col}: {a[col]!r} != {b[col]!r}"
        for col in FLOAT_COLUMNS:
            assert np.isclose(a[col], b[col], atol=atol, rtol=0, equal_nan=True), (
                f"{sid}.{col}: {a[col]} != {b[col]}")


def kill_process_group(proc: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
    """Send ``sig`` to the process group led by ``proc`` (started with start_new_session=True)."""
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def all_files(root: Path) -> Iterator[Path]:
    """Every regular file under ``root`` (recursively)."""
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            p = Path(dirpath) / name
            if p.is_file() and not p.is_symlink():
                yield p
