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

from tests.ports import free_port
from tests.screen.conftest import REPO


def _head_env(**extra: str) -> dict[str, str]:
    """Environment for a private head and its jobs: this interpreter's bin first on PATH, as in an
    activated virtual environment, so that a job's ``python`` is this one even when the tests run
    as ``.venv/bin/python -m pytest`` (otherwise it may be a Python without cathode_ray's deps)."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return {**os.environ, "PATH": path, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(REPO),
            **extra}


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
    dash = free_port()
    temp_dir = tempfile.mkdtemp(prefix="crs_", dir="/tmp")  # short: socket path length limit
    env = _head_env()
    ray_bin = _start_head(temp_dir, env, free_port(), "--num-cpus=2", "--include-dashboard=true",
                          f"--dashboard-port={dash}")
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
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:] + _agent_log(temp_dir)
        assert "run job1: 8 inputs" in job.stdout
        attempt = json.loads((out / "_runs" / "job1.json").read_text())["attempts"][-1]
        assert (attempt["config"]["graph_actors"], attempt["config"]["light_tasks"]) == (1, 1)
    finally:
        _stop_head(temp_dir)


@pytest.mark.slow
def test_gpu_screen_waits_for_the_autoscaler_to_add_a_gpu_node(tiny_model, references,
                                                                tmp_path) -> None:
    """The autoscaler half of ``wait_for_gpus`` on Ray's fake multi-node provider: a head without
    GPUs and a pool of one-GPU nodes that scales from zero, as in cluster.yaml. Nothing but the
    screen's request makes the autoscaler start a node; the screen's inference actor then lands
    on that node (Ray gives it the node's GPU) and, with a CPU build of torch, fails saying so."""
    temp_dir = tempfile.mkdtemp(prefix="crs_", dir="/tmp")
    gcs = free_port()
    store = 80_000_000  # bytes of object store per node: small, this machine has 24 GB
    config = {
        "cluster_name": "fake-gpu-pool", "max_workers": 1, "head_node_type": "ray.head.default",
        "provider": {"type": "fake_multinode", "gcs_address": f"127.0.0.1:{gcs}",
                     "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 1}, "node_config": {}, "max_workers": 0},
            "gpu_workers": {"resources": {"CPU": 1, "GPU": 1, "object_store_memory": store},
                            "node_config": {}, "min_workers": 0, "max_workers": 1}},
        "auth": {}, "upscaling_speed": 1.0, "idle_timeout_minutes": 1, "docker": {},
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [],
        **{k: [] for k in ("initialization_commands", "setup_commands", "head_setup_commands",
                           "worker_setup_commands", "head_start_ray_commands",
                           "worker_start_ray_commands")}}
    (tmp_path / "autoscaling.json").write_text(json.dumps(config))
    env = _head_env(RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1")
    _start_head(temp_dir, env, gcs, "--num-cpus=1", "--num-gpus=0", "--include-dashboard=false",
                f"--object-store-memory={store}",
                f"--autoscaling-config={tmp_path / 'autoscaling.json'}")
    client = f"""
import json, time, ray
from cathode_ray.screen.pipeline import NoGPUError, wait_for_gpus
ray.init(address="127.0.0.1:{gcs}")
before = ray.cluster_resources().get("GPU", 0)
t0 = time.monotonic()
wait_for_gpus(1, 120)
waited = time.monotonic() - t0
try:
    wait_for_gpus(2, 3)  # the pool holds one node at most
    error = None
except NoGPUError as exc:
    error = str(exc)
import torch
from cathode_ray.screen.pipeline import ScreenConfig, run
try:
    summary = run(ScreenConfig(library="demo", demo_size=8, model={str(tiny_model)!r},
                               references={references!r}, out={str(tmp_path / "dest")!r},
                               gpu_actors=1, gpu_wait_s=60, verbose=False))
    screen = f"{{summary.n_results + summary.n_rejects}} rows"
except Exception as exc:
    screen = str(exc)
print(json.dumps({{"before": before, "after": ray.cluster_resources().get("GPU", 0),
                  "waited": waited, "error": error, "screen": screen,
                  "cuda": torch.cuda.is_available()}}))
"""
    try:
        time.sleep(3)  # the autoscaler's first pass: nothing is started without a request
        proc = subprocess.run([sys.executable, "-c", client], env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        got = json.loads(proc.stdout.strip().splitlines()[-1])
        assert got["before"] == 0 and got["after"] == 1, got
        assert 0 < got["waited"] < 120
        assert "asks for 2 GPU inference actor(s) but the Ray cluster has 1 GPU(s) after 3 s" \
            in got["error"]
        if got["cuda"]:
            assert got["screen"] == "8 rows", got["screen"]
        else:
            assert "InferenceStage" in got["screen"] and "sees no CUDA device" in got["screen"]
            assert "CUDA_VISIBLE_DEVICES='0'" in got["screen"], got["screen"]  # Ray gave it the GPU
    finally:
        _stop_head(temp_dir)


def _start_head(temp_dir: str, env: dict[str, str], gcs_port: int, *args: str) -> str:
    """``ray start --head`` with its own temp dir and free ports; returns the ``ray`` binary."""
    ray_bin = str(Path(sys.executable).with_name("ray"))
    start = subprocess.run(
        [ray_bin, "start", "--head", f"--port={gcs_port}", f"--temp-dir={temp_dir}",
         "--disable-usage-stats", *args,
         # every agent port free-picked: other local Ray heads may hold the default ones
         *(f"--{flag}={free_port()}" for flag in (
             "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
             "runtime-env-agent-port", "ray-client-server-port"))],
        env=env, capture_output=True, text=True, timeout=120)
    assert start.returncode == 0, start.stderr
    return ray_bin


def _agent_log(temp_dir: str, lines: int = 20) -> str:
    """The last WARNING/ERROR lines of the head's dashboard agent (why no agent took the job)."""
    logs = sorted(Path(temp_dir).glob("session_*/logs/dashboard_agent.log"))
    if not logs:
        return f"\n(no dashboard_agent.log under {temp_dir})"
    bad = [ln for ln in logs[-1].read_text(errors="replace").splitlines()
           if "WARNING" in ln or "ERROR" in ln]
    return "\ndashboard agent:\n" + "\n".join(bad[-lines:])


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
