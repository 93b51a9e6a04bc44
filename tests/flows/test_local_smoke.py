"""The local target (a real `python -m serving` process, stopped by PID) and the smoke test."""

from __future__ import annotations

import json
import os
import socket
from dataclasses import replace

import pytest

from flows.deploy import DeployError, Endpoint, ModelVersion, deploy
from flows.deploy.local import pid_alive, read_state, state_path, stop_server
from flows.params import ReleaseParams
from flows.reference import load_references
from flows.smoke import smoke_test
from flows.stages.smoke import SmokeTestFailed, run_smoke_test


@pytest.fixture(scope="module")
def local_server(default_artifact, tmp_path_factory, free_port):
    """One real server for the module, deployed the way the release deploys it."""
    state_dir = tmp_path_factory.mktemp("local-state")
    params = ReleaseParams(state_dir=state_dir, server={"port": free_port(), "workers": 1})
    endpoint = deploy("local", default_artifact, params, ModelVersion("onnxship-classifier", "7"))
    yield endpoint, params
    stop_server(state_dir)
    assert not pid_alive(endpoint.details["pid"])


@pytest.fixture(scope="module")
def references():
    return load_references()


def test_local_deploy_records_pid_url_and_key(local_server):
    endpoint, params = local_server
    assert isinstance(endpoint, Endpoint) and endpoint.target == "local"
    assert endpoint.url == f"http://127.0.0.1:{params.server.port}"
    state = json.loads(state_path(params.state_dir).read_text())
    assert state["pid"] == endpoint.details["pid"] and pid_alive(state["pid"])
    assert state["api_key"] == endpoint.api_key and state["version"] == "7"
    assert oct(os.stat(state_path(params.state_dir)).st_mode & 0o777) == "0o600"
    assert endpoint.api_key not in json.dumps(endpoint.public())


def test_smoke_passes_against_the_real_server(local_server, references):
    endpoint, _ = local_server
    result = run_smoke_test(endpoint.url, endpoint.api_key, references, latency_budget_s=5.0)
    assert result.passed, result.failures
    assert result.healthy and result.ready
    assert len(result.checks) == len(references)
    assert result.correct >= 3 and result.labelled == 4


def test_smoke_fails_on_wrong_classes(local_server, references):
    endpoint, _ = local_server
    wrong = [replace(r, expected_class=(r.expected_class + 1) % 1000) if r.expected_class is not None else r
             for r in references]
    result = run_smoke_test(endpoint.url, endpoint.api_key, wrong, latency_budget_s=5.0, min_accuracy=1.0)
    assert not result.passed
    text = "\n".join(result.failures)
    assert "expected classes: 0/4 correct" in text and "coffee.png: expected class 968" in text
    assert "FAILED" in result.markdown()


def test_smoke_fails_on_wrong_key_and_latency_budget(local_server, references):
    endpoint, _ = local_server
    result = run_smoke_test(endpoint.url, "wrong-key", references[:1], latency_budget_s=5.0)
    assert not result.passed and "401" in result.failures[0]
    slow = run_smoke_test(endpoint.url, endpoint.api_key, references[:1], latency_budget_s=1e-6)
    assert not slow.passed and "over the budget" in slow.failures[0]


def test_smoke_fails_loudly_on_unreachable_url(references, free_port):
    url = f"http://127.0.0.1:{free_port()}"
    result = run_smoke_test(url, "k", references, latency_budget_s=1.0, timeout_s=2.0)
    assert not result.passed and not result.healthy
    assert result.failures[0].startswith(f"health: cannot reach {url}/health")


def test_smoke_flow_raises_and_logs_to_mlflow(prefect_harness, tracking_uri, tmp_path, free_port):
    from flows import registry

    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(SmokeTestFailed, match="cannot reach"):
        smoke_test(url=url, tracking_uri=tracking_uri, state_dir=tmp_path / "none", model_name="m")
    client = registry.connect(tracking_uri)
    experiment = client.get_experiment_by_name("m-smoke-tests")
    runs = client.search_runs([experiment.experiment_id])
    assert runs[0].data.metrics["smoke/passed"] == 0.0 and runs[0].info.status == "FAILED"


def test_smoke_flow_finds_the_local_server_from_its_record(prefect_harness, local_server, tracking_uri):
    _, params = local_server
    result = smoke_test(state_dir=params.state_dir, tracking_uri=tracking_uri, latency_budget_s=5.0)
    assert result["passed"]


def test_port_held_by_another_process_is_refused(default_artifact, tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        params = ReleaseParams(state_dir=tmp_path, server={"port": busy.getsockname()[1]})
        with pytest.raises(DeployError, match="in use by another process"):
            deploy("local", default_artifact, params)
    assert read_state(tmp_path) is None


def test_stop_command_stops_by_pid_and_keeps_the_key(local_server, capsys, monkeypatch):
    """Last in this module: `make stop-server` (python -m flows.deploy.local stop) on the module's server."""
    from flows.deploy.local import main as local_main, resolve_api_key

    endpoint, params = local_server
    pid = endpoint.details["pid"]
    assert local_main(["status", "--state-dir", str(params.state_dir)]) == 0
    assert local_main(["stop", "--state-dir", str(params.state_dir)]) == 0
    assert f"stopped local server pid {pid}" in capsys.readouterr().out
    assert not pid_alive(pid)
    state = read_state(params.state_dir)
    assert "pid" not in state and state["api_key"] == endpoint.api_key
    assert local_main(["status", "--state-dir", str(params.state_dir)]) == 1
    monkeypatch.delenv("API_KEY", raising=False)
    assert resolve_api_key(state) == (endpoint.api_key, "state")  # the next release reuses the key
    capsys.readouterr()
    assert local_main(["key", "--state-dir", str(params.state_dir)]) == 0  # what `make api-key` prints
    assert capsys.readouterr().out.strip() == endpoint.api_key


def test_smoke_flow_skips_a_server_stopped_on_purpose(prefect_harness, local_server, tracking_uri):
    """After `make stop-server` the scheduled smoke test has nothing to check: it says so and does not
    fail (a failed run would count towards an automatic rollback)."""
    _, params = local_server
    assert "pid" not in read_state(params.state_dir)  # stopped by the test above
    result = smoke_test(state_dir=params.state_dir, tracking_uri=tracking_uri, latency_budget_s=5.0)
    assert "stopped on purpose" in result["skipped"]
