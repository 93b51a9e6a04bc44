"""The cycle a user runs, for real: `prefect server start`, `prefect deploy` (prefect.yaml),
`prefect deployment run 'release/local'`, `prefect worker start --pool onnxship --run-once`;
then the run must be Completed and MLflow must hold the new champion version."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from flows import registry
from flows.deploy.local import read_state, stop_server

PREFECT = str(Path(sys.executable).with_name("prefect"))


def wait_healthy(url: str, process: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"prefect server exited with {process.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"prefect server at {url} not healthy after {timeout} s")


def stop_group(process: subprocess.Popen, timeout: float = 20.0) -> None:
    if process.poll() is not None:
        return
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=timeout / 2)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture
def prefect_server(tmp_path, free_port):
    """A real `prefect server start` on a free port, with its own PREFECT_HOME; stopped by PID."""
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_API_URL": f"http://127.0.0.1:{port}/api", "PREFECT_LOGGING_LEVEL": "WARNING",
           "PREFECT_SERVER_API_PORT": str(port)}
    log = open(tmp_path / "prefect-server.log", "wb")
    process = subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                               env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_healthy(env["PREFECT_API_URL"], process)
        yield env
    finally:
        stop_group(process)
        log.close()


def prefect(env: dict, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    done = subprocess.run([PREFECT, *args], env=env, cwd=env["PWD"], capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"prefect {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done


def run_deployment(env: dict, name: str, params: dict, cwd: Path) -> str:
    """`prefect deployment run NAME --watch` while a `--run-once` worker executes it; the watch output."""
    watch = subprocess.Popen([PREFECT, "deployment", "run", name, "--params", json.dumps(params), "--watch",
                              "--watch-timeout", "400"], env=env, cwd=env["PWD"], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        time.sleep(2)  # let the run be created before the worker polls
        worker = subprocess.run([PREFECT, "worker", "start", "--pool", "onnxship", "--run-once"], env=env,
                                cwd=cwd, capture_output=True, text=True, timeout=450)
        output, _ = watch.communicate(timeout=60)
        assert watch.returncode == 0, f"{name} did not complete:\n{output}\nworker:\n{worker.stdout[-4000:]}\n{worker.stderr[-4000:]}"
        assert "Completed" in output
        return output
    finally:
        stop_group(watch)


def test_deploy_worker_run_cycle(prefect_server, repo_root, tmp_path, free_port):
    # the worker only takes runs that are due now, never a scheduled smoke test minutes ahead
    env = {**prefect_server, "PWD": str(repo_root), "PREFECT_WORKER_PREFETCH_SECONDS": "1"}
    prefect(env, "work-pool", "create", "onnxship", "--type", "process")
    prefect(env, "deploy", "--name", "local", "--name", "every-15-minutes", "--no-prompt")
    schedule = prefect(env, "deployment", "inspect", "smoke-test/every-15-minutes").stdout
    assert "*/15 * * * *" in schedule
    release_deployment = prefect(env, "deployment", "inspect", "release/local").stdout
    assert "set_working_directory" in release_deployment and str(repo_root) in release_deployment  # the pull step

    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    state_dir = tmp_path / "state"
    params = {"params": {
        "tracking_uri": uri, "state_dir": str(state_dir), "output_dir": str(tmp_path / "models"),
        "server": {"port": free_port(), "workers": 1},
        "benchmark": {"batch_sizes": [1], "duration_s": 0.05, "warmup_calls": 1, "include_torch": False},
    }}
    try:
        run_deployment(env, "release/local", params, cwd=tmp_path)
        # the scheduled smoke test, run now through its deployment against the server just deployed
        smoke = {"state_dir": str(state_dir), "tracking_uri": uri, "latency_budget_s": 5.0}
        run_deployment(env, "smoke-test/every-15-minutes", smoke, cwd=tmp_path)
    finally:
        if read_state(state_dir):
            stop_server(state_dir)

    client = registry.connect(uri)
    assert registry.aliases(client, "onnxship-classifier") == {"candidate": "1", "champion": "1"}
    assert client.get_model_version("onnxship-classifier", "1").tags["gate.verdict"] == "pass"
    smoke_runs = client.search_runs([client.get_experiment_by_name("onnxship-classifier-smoke-tests").experiment_id])
    assert smoke_runs[0].data.metrics["smoke/passed"] == 1.0
    assert smoke_runs[0].data.tags["model_version"] == "1"
