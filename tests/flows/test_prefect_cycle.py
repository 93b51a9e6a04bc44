"""The cycle a user runs, for real, on one `prefect server start` (own PREFECT_HOME, free port):

1. `prefect deploy` (prefect.yaml), `prefect deployment run 'release/local'` with a `--run-once` worker:
   the run completes and MLflow holds the new champion; the scheduled smoke test, run now, passes.
2. The champion breaks: its server dies. Two failed runs of the scheduled smoke test fire the trigger in
   prefect.yaml, the rollback deployment runs on a long-running worker, @previous serves again, and a
   second automatic rollback without a new release is refused.
3. The app key never leaves the server's 0600 record: not in Prefect's database or storage, not in the
   MLflow store, the reports, or anything the commands printed.

Every flow the workers run finds the test's MLflow store and state directory through the worker's
environment (MLFLOW_TRACKING_URI, ONNXSHIP_STATE_DIR), the way a user's worker would.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests
from support import stop_process_group

from flows import registry
from flows.deploy import ModelVersion, deploy
from flows.deploy.local import read_state, state_is_alive, stop_server
from flows.params import ReleaseParams

PREFECT = str(Path(sys.executable).with_name("prefect"))
NAME = "onnxship-classifier"
CANARY_KEY = "canary-app-key-7f3a9c1e5b2d"  # searched for everywhere at the end


def wait_healthy(url: str, process: subprocess.Popen, timeout: float = 180.0) -> None:
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


@pytest.fixture(scope="module")
def cycle(tmp_path_factory, free_port, repo_root):
    """A real Prefect server and the environment of a user's worker; everything stopped by PID."""
    tmp = tmp_path_factory.mktemp("prefect-cycle")
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(tmp / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_API_URL": f"http://127.0.0.1:{port}/api", "PREFECT_LOGGING_LEVEL": "WARNING",
           "PREFECT_SERVER_API_PORT": str(port), "PWD": str(repo_root),
           # the worker takes only runs that are due now (never a smoke test scheduled minutes ahead), quickly
           "PREFECT_WORKER_PREFETCH_SECONDS": "1", "PREFECT_WORKER_QUERY_SECONDS": "1",
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlruns/mlflow.db", "ONNXSHIP_STATE_DIR": str(tmp / "state"),
           "API_KEY": CANARY_KEY}
    log = open(tmp / "prefect-server.log", "wb")
    server = subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    printed: list[str] = []  # everything the commands printed, searched for the key at the end
    try:
        wait_healthy(env["PREFECT_API_URL"], server)
        yield {"env": env, "tmp": tmp, "uri": env["MLFLOW_TRACKING_URI"], "state_dir": tmp / "state",
               "printed": printed, "port": free_port()}
    finally:
        if read_state(tmp / "state"):
            stop_server(tmp / "state")
        stop_process_group(server.pid)
        log.close()


def prefect(env: dict, *args: str, timeout: float = 180, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([PREFECT, *args], env=env, cwd=env["PWD"], capture_output=True, text=True, timeout=timeout)
    assert not check or done.returncode == 0, f"prefect {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done


def run_deployment(cycle: dict, name: str, params: dict, worker: bool = True) -> tuple[int, str]:
    """`prefect deployment run NAME --watch`, with a `--run-once` worker unless one is running already."""
    env = cycle["env"]
    watch = subprocess.Popen([PREFECT, "deployment", "run", name, "--params", json.dumps(params), "--watch",
                              "--watch-timeout", "400"], env=env, cwd=env["PWD"], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        if worker:
            time.sleep(2)  # let the run be created before the worker polls
            done = subprocess.run([PREFECT, "worker", "start", "--pool", "onnxship", "--run-once"], env=env,
                                  cwd=cycle["tmp"], capture_output=True, text=True, timeout=450)
            cycle["printed"] += [done.stdout, done.stderr]
        output, _ = watch.communicate(timeout=450)
        cycle["printed"].append(output)
        return watch.returncode, output
    finally:
        stop_process_group(watch.pid)


def test_deploy_worker_run_cycle(cycle, repo_root):
    env = cycle["env"]
    prefect(env, "work-pool", "create", "onnxship", "--type", "process")
    prefect(env, "deploy", "--name", "local", "--name", "every-15-minutes", "--no-prompt")
    schedule = prefect(env, "deployment", "inspect", "smoke-test/every-15-minutes").stdout
    assert "*/15 * * * *" in schedule
    release_deployment = prefect(env, "deployment", "inspect", "release/local").stdout
    assert "set_working_directory" in release_deployment and str(repo_root) in release_deployment  # the pull step

    params = {"params": {
        "output_dir": str(cycle["tmp"] / "models"), "server": {"port": cycle["port"], "workers": 1},
        "benchmark": {"batch_sizes": [1], "duration_s": 0.05, "warmup_calls": 1, "include_torch": False},
        "gate": {"max_p95_latency_ms": 60000},  # a 0.05 s sample: one stall is the p95 (rules: test_gate.py)
    }}
    code, output = run_deployment(cycle, "release/local", params)
    assert code == 0 and "Completed" in output, output
    # the scheduled smoke test, run now through its deployment against the server just deployed
    code, output = run_deployment(cycle, "smoke-test/every-15-minutes", {"latency_budget_s": 5.0})
    assert code == 0 and "Completed" in output, output

    client = registry.connect(cycle["uri"])
    assert registry.aliases(client, NAME) == {"candidate": "1", "champion": "1"}
    assert client.get_model_version(NAME, "1").tags["gate.verdict"] == "pass"
    smoke_runs = client.search_runs([client.get_experiment_by_name(f"{NAME}-smoke-tests").experiment_id])
    assert smoke_runs[0].data.metrics["smoke/passed"] == 1.0
    assert smoke_runs[0].data.tags["model_version"] == "1"


def promote_a_second_version(cycle: dict, artifact: Path, monkeypatch) -> str:
    """What a second successful release leaves behind: v2 registered, serving on the port, @champion."""
    monkeypatch.setenv("API_KEY", CANARY_KEY)
    client = registry.connect(cycle["uri"])
    experiment_id = client.get_experiment_by_name(NAME).experiment_id
    run_id = registry.start_run(client, experiment_id, "release v2", {})
    version = registry.register_release(client, NAME, experiment_id, run_id, artifact, {}).version
    registry.end_run(client, run_id)
    registry.tag_version(client, NAME, version, {"release.outcome": "promoted", "deploy.target": "local"})
    params = ReleaseParams(state_dir=cycle["state_dir"], server={"port": cycle["port"], "workers": 1})
    deploy("local", artifact, params, ModelVersion(NAME, version, run_id))
    registry.promote(client, NAME, version)
    return version


@contextmanager
def prefect_api(env: dict):
    """A Prefect client on the test's server (this process is not configured for it otherwise)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: env["PREFECT_API_URL"]}), get_client(sync_client=True) as client:
        yield client


def flow_runs_of(env: dict, deployment: str) -> list:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    with prefect_api(env) as client:
        found = client.read_deployment_by_name(deployment)
        return client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[found.id])))


def test_failing_scheduled_smoke_test_rolls_back_automatically(cycle, default_artifact, monkeypatch):
    env = cycle["env"]
    v2 = promote_a_second_version(cycle, default_artifact, monkeypatch)
    prefect(env, "deploy", "--name", "rollback", "--no-prompt")  # with its trigger (prefect.yaml)
    worker_log = open(cycle["tmp"] / "worker.log", "w")
    worker = subprocess.Popen([PREFECT, "worker", "start", "--pool", "onnxship"], env=env, cwd=cycle["tmp"],
                              stdout=worker_log, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        state = read_state(cycle["state_dir"])
        assert state["version"] == v2
        os.killpg(state["pid"], signal.SIGKILL)  # the champion's server dies; its record stays
        for _ in range(2):
            code, output = run_deployment(cycle, "smoke-test/every-15-minutes", {"latency_budget_s": 5.0},
                                          worker=False)
            assert code != 0 and "Failed" in output, output
        deadline = time.monotonic() + 240
        runs = []
        while time.monotonic() < deadline:
            runs = flow_runs_of(env, "rollback/rollback")
            if runs and all(run.state and run.state.is_final() for run in runs):
                break
            time.sleep(2)
        assert [run.state.type.value for run in runs] == ["COMPLETED"], runs
        assert runs[0].parameters["automatic"] is True
    finally:
        stop_process_group(worker.pid)
        worker_log.close()
        cycle["printed"].append((cycle["tmp"] / "worker.log").read_text())

    client = registry.connect(cycle["uri"])
    assert registry.aliases(client, NAME)["champion"] == "1" and registry.aliases(client, NAME)["previous"] == v2
    old, restored = client.get_model_version(NAME, v2).tags, client.get_model_version(NAME, "1").tags
    assert old["rollback.reason"].startswith("automatic: the last 2 smoke runs of the champion failed")
    assert old["role"] == "previous" and restored["role"] == "champion" and restored["rollback.restored_from"] == v2
    state = read_state(cycle["state_dir"])
    assert state_is_alive(state) and state["version"] == "1"  # the previous version serves again
    served = requests.get(f"{state['url']}/model", headers={"X-API-Key": CANARY_KEY}, timeout=10).json()
    assert served["version"] == "1"
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with prefect_api(env) as prefect_client:
        artifacts = prefect_client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[f"rollback-{NAME}"])))
    assert artifacts and f"v{v2} -> v1" in artifacts[0].data

    # never twice in a row without a new release, whatever the smoke tests say
    from flows.rollback import rollback_release

    again = rollback_release(NAME, cycle["uri"], cycle["state_dir"], automatic=True)
    assert not again["rolled_back"] and "already rolled back automatically" in again["reason"]
    assert registry.aliases(client, NAME)["champion"] == "1"


def test_the_app_key_is_stored_nowhere_but_the_servers_record(cycle):
    """Searched after the runs are final and the workers have exited (logs reach the database in batches)."""
    needle = CANARY_KEY.encode()
    home, tmp = Path(cycle["env"]["PREFECT_HOME"]), cycle["tmp"]
    hits = [f"{db}: {table}" for db in (home / "prefect.db", tmp / "mlruns" / "mlflow.db")
            for table in tables_containing(db, CANARY_KEY)]
    allowed = {cycle["state_dir"] / "local-server.json"}
    for path in [p for root in (home, tmp) for p in root.rglob("*") if p.is_file()]:
        if path not in allowed and path.suffix != ".db" and needle in path.read_bytes():
            hits.append(str(path))
    hits += [f"command output #{i}" for i, text in enumerate(cycle["printed"]) if CANARY_KEY in text]
    assert hits == [], f"the API key leaked into: {hits}"
    assert needle in (cycle["state_dir"] / "local-server.json").read_bytes()  # the search would have found it


def tables_containing(db: Path, needle: str) -> list[str]:
    """Tables of a sqlite database (its -wal file included) with a text value containing `needle`."""
    connection = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        found = []
        for (table,) in connection.execute("SELECT name FROM sqlite_master WHERE type='table'"):
            columns = [row[1] for row in connection.execute(f'PRAGMA table_info("{table}")')]
            for column in columns:
                query = f'SELECT 1 FROM "{table}" WHERE CAST("{column}" AS TEXT) LIKE ? LIMIT 1'
                if connection.execute(query, (f"%{needle}%",)).fetchone():
                    found.append(f"{table}.{column}")
        return found
    finally:
        connection.close()
