"""cluster.yaml passes Ray's own autoscaler validation; jobs/screen_library.py runs as a Ray job."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from tests.screen.conftest import REPO, free_port


def test_cluster_yaml_validates_with_ray_schema() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(yaml.safe_load((REPO / "cluster.yaml").read_text()))
    validate_config(config)  # Ray's JSON schema for cluster launcher configs
    nodes = config["available_node_types"]
    assert nodes["gpu_workers"]["min_workers"] == 0 and nodes["gpu_workers"]["max_workers"] >= 1
    assert config["idle_timeout_minutes"] > 0
    assert any("pip install" in c and "torch" in c for c in config["setup_commands"])


@pytest.mark.slow
def test_ray_job_submit_runs_screen(tiny_model, references, tmp_path) -> None:
    """A private head (own temp dir + ports) stopped by its own pids, not ``ray stop``."""
    ray_bin = str(Path(sys.executable).with_name("ray"))
    dash, gcs = free_port(), free_port()
    temp_dir = tempfile.mkdtemp(prefix="crs_", dir="/tmp")  # short: socket path length limit
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(REPO)}
    start = subprocess.run(
        [ray_bin, "start", "--head", f"--port={gcs}", "--num-cpus=2", "--include-dashboard=true",
         f"--dashboard-port={dash}", f"--temp-dir={temp_dir}", "--disable-usage-stats",
         # every agent port free-picked: other local Ray heads may hold the default ones
         *(f"--{flag}={free_port()}" for flag in (
             "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
             "runtime-env-agent-port", "ray-client-server-port"))],
        env=env, capture_output=True, text=True, timeout=120)
    assert start.returncode == 0, start.stderr
    try:
        out = tmp_path / "dest"
        cmd = [ray_bin, "job", "submit", "--address", f"http://127.0.0.1:{dash}",
             "--working-dir", str(REPO), "--", "python", "jobs/screen_library.py",
             "--library", "demo", "--demo-size", "8", "--model", str(tiny_model),
             "--out", str(out), "--references", references, "--run-id", "job1",
             "--graph-actors", "1", "--light-tasks", "1"]
        for _ in range(12):  # the head's job agent takes a few seconds to come up
            job = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400,
                                 cwd=REPO)
            if "No available agent" not in job.stderr + job.stdout:
                break
            time.sleep(5)
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        assert "run job1: 8 inputs" in job.stdout
        attempt = json.loads((out / "_runs" / "job1.json").read_text())["attempts"][-1]
        assert (attempt["config"]["graph_actors"], attempt["config"]["light_tasks"]) == (1, 1)
    finally:
        _stop_head(temp_dir)


def _stop_head(temp_dir: str) -> None:
    """Kill only the processes of this head: those whose command line names its temp dir."""
    import importlib

    import ray  # noqa: F401  - importing ray puts its bundled psutil on sys.path

    psutil = importlib.import_module("psutil")

    procs = [p for p in psutil.process_iter(["pid", "cmdline"])
             if temp_dir in " ".join(p.info["cmdline"] or [])]
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=15)
    for p in alive:
        p.kill()
