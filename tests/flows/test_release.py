"""The release flow for real (Prefect harness, sqlite MLflow store, local server on a free port):
a good release becomes champion; a deliberately broken candidate is rejected by the gate, moves no
alias and keeps the champion serving; rollback restores @previous and restarts the server."""

from __future__ import annotations

import pytest

from flows import registry
from flows.deploy.local import read_state, state_is_alive
from flows.release import GateRejected, ReleaseFailed, release
from flows.rollback import rollback_release
from flows.params import SmokeSettings
from flows.reference import load_references
from flows.stages.smoke import run_smoke_test

NAME = "onnxship-classifier"


@pytest.fixture(scope="module")
def first_release(prefect_harness, tmp_path_factory, fast_params):
    """Release 1 on a fresh store: becomes champion and serves on the local target."""
    tmp = tmp_path_factory.mktemp("release")
    uri = f"sqlite:///{tmp}/mlruns/mlflow.db"
    state_dir = tmp / "state"
    params = fast_params(tmp, uri, state_dir)
    try:
        outcome = release(params)
        yield params, outcome
    finally:
        from flows.deploy.local import stop_server

        stop_server(state_dir)


def test_good_release_becomes_champion_and_serves(first_release):
    params, outcome = first_release
    assert outcome["outcome"] == "promoted" and outcome["version"] == "1" and outcome["verdict"] == "pass"
    assert list(outcome["timings"]) == ["validate", "export", "simplify", "parity", "variants", "benchmark", "register",
                                        "gate", "deploy", "smoke test", "promote"]
    client = registry.connect(params.tracking_uri)
    assert registry.aliases(client, NAME) == {"candidate": "1", "champion": "1"}
    version = client.get_model_version(NAME, "1")
    assert version.tags["gate.verdict"] == "pass" and version.tags["release.outcome"] == "promoted"
    assert version.tags["role"] == "champion"
    run = client.get_run(version.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "onnxship-classifier v1"
    for key in ("arch", "weights_sha256", "opset", "git_commit", "resize_policy"):
        assert key in run.data.params
    for key in ("graph/nodes_exported_count", "graph/nodes_simplified_count", "parity/top1_agreement",
                "parity/max_abs_prob_diff", "reference/top1_accuracy", "benchmark/ort_b1_p95_ms",
                "benchmark/ort_decode_b2_img_per_s", "benchmark/torch_b1_p50_ms", "smoke/passed", "stage/export_s",
                "stage/smoke_test_s", "gate/passed"):
        assert key in run.data.metrics, key
    # the run spans the release: it started before export and ended after the smoke test
    assert (run.info.end_time - run.info.start_time) / 1000 >= sum(outcome["timings"].values()) - outcome["timings"]["validate"] - 1
    artifacts = {a.path for a in client.list_artifacts(version.run_id)}
    assert {"parity_report.json", "model_card.md", "benchmark", "release_report.md"} <= artifacts
    state = read_state(params.state_dir)
    assert state_is_alive(state) and state["version"] == "1"
    report = (params.output_dir / "release" / "report.md").read_text()
    assert "PROMOTED to @champion" in report and "| batch | ORT p50" in report
    # the bundled photos alone are too few to judge int8: fp32 ships, and the report says why and what to do
    assert version.tags["precision"] == "fp32" and run.data.tags["precision"] == "fp32"
    assert "| int8 | - | -x |" in report and "refused: only 4 evaluation images (min 50): not built; give --eval-images" in report
    children = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}'")
    assert {c.data.tags["precision"]: c.data.tags["variant.verdict"] for c in children} == {
        "fp32": "chosen (baseline)", "int8": "refused"}
    from prefect.artifacts import Artifact

    artifact = Artifact.get("release-onnxship-classifier")  # the markdown a person reads in the UI
    assert artifact is not None and artifact.data == report


def test_broken_candidate_is_rejected_and_moves_nothing(first_release, broken_weights):
    params, _ = first_release
    quick = params.benchmark.model_copy(update={"include_torch": False, "batch_sizes": (1,)})
    broken = params.model_copy(update={"weights": broken_weights, "benchmark": quick})
    with pytest.raises(ReleaseFailed, match="REJECTED by the gate") as info:
        release(broken)
    assert isinstance(info.value.__cause__, GateRejected)
    client = registry.connect(params.tracking_uri)
    assert registry.aliases(client, NAME) == {"candidate": "2", "champion": "1"}  # only @candidate moved
    tags = client.get_model_version(NAME, "2").tags
    assert tags["gate.verdict"] == "fail" and tags["release.outcome"] == "rejected" and tags["role"] == "rejected"
    assert "accuracy vs champion v1" in tags["gate.reasons"] and tags["gate.compared_with"] == "1"
    rejected_run = client.get_run(client.get_model_version(NAME, "2").run_id)
    assert rejected_run.info.status == "FAILED"
    from flows.stages.smoke import SMOKE_METRIC_KEYS

    assert set(SMOKE_METRIC_KEYS) <= set(rejected_run.data.metrics), "same metric keys as a promoted release"
    state = read_state(params.state_dir)
    assert state_is_alive(state) and state["version"] == "1"  # the champion keeps serving


def test_failed_smoke_test_keeps_the_champion(first_release):
    params, _ = first_release
    quick = params.benchmark.model_copy(update={"include_torch": False, "batch_sizes": (1,)})
    impatient = params.model_copy(update={"benchmark": quick, "smoke": SmokeSettings(latency_budget_s=1e-6, timeout_s=10)})
    with pytest.raises(ReleaseFailed, match="FAILED at smoke test"):
        release(impatient)
    client = registry.connect(params.tracking_uri)
    assert registry.alias_version(client, NAME, "champion") == "1"
    new = max(registry.aliases(client, NAME).values(), key=int)
    tags = client.get_model_version(NAME, new).tags
    assert tags["gate.verdict"] == "pass" and tags["release.outcome"] == "failed" and tags["smoke.passed"] == "false"
    assert tags["role"] == "failed" and client.get_model_version(NAME, "2").tags["role"] == "rejected"
    state = read_state(params.state_dir)
    assert state_is_alive(state) and state["version"] == "1"  # the champion was put back on the port


def test_rollback_restores_previous_and_restarts_the_server(first_release, default_artifact):
    params, _ = first_release
    client = registry.connect(params.tracking_uri)
    experiment_id = client.get_experiment_by_name(NAME).experiment_id
    run_id = registry.start_run(client, experiment_id, "hotfix", {})
    v3 = registry.register_release(client, NAME, experiment_id, run_id, default_artifact, {}).version
    registry.promote(client, NAME, v3)  # as if release 3 had passed
    old_pid = read_state(params.state_dir)["pid"]

    outcome = rollback_release(NAME, params.tracking_uri, params.state_dir, restart_local=True,
                               work_dir=params.output_dir / "rollback")
    assert (outcome["from_version"], outcome["to_version"]) == (v3, "1")
    assert registry.aliases(client, NAME) == {"candidate": v3, "champion": "1", "previous": v3}
    state = read_state(params.state_dir)
    assert state["version"] == "1" and state["pid"] != old_pid and state_is_alive(state)
    smoke = run_smoke_test(state["url"], state["api_key"], load_references(params.images_dir, params.manifest), 5.0)
    assert smoke.passed, smoke.failures


def test_a_second_release_of_the_same_model_is_refused(first_release, repo_root):
    """Two releases at once: the second is refused within seconds, naming the first; the first completes."""
    import json
    import os
    import subprocess
    import sys
    import threading
    import time

    from flows.lock import lock_path

    params, _ = first_release
    quick = params.benchmark.model_copy(update={"include_torch": False, "batch_sizes": (1,)})
    first = params.model_copy(update={"benchmark": quick})
    outcome: dict = {}
    worker = threading.Thread(target=lambda: outcome.update(release(first)), name="first-release")
    worker.start()
    path = lock_path(params.state_dir, NAME)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and '"pid": %d' % os.getpid() not in (path.read_text() if path.exists() else ""):
        time.sleep(0.2)
    assert worker.is_alive(), "the first release ended before the second could start"
    params_file = params.output_dir / "second-release.json"
    params_file.write_text(first.model_dump_json())
    second = subprocess.run([sys.executable, "-m", "flows.release", "--params-file", str(params_file)],
                            cwd=repo_root, capture_output=True, text=True, timeout=120)
    worker.join(timeout=600)
    assert second.returncode == 1, second.stdout + second.stderr
    assert f"another release of {NAME} is running (pid {os.getpid()}" in second.stderr
    assert outcome["outcome"] == "promoted"
    assert json.loads(path.read_text() or "{}") == {}  # released: nobody holds it now


def test_a_garbage_weights_file_fails_with_a_summary_and_one_line(first_release, tmp_path, capsys):
    """No traceback without --debug: the summary says which stage failed and why."""
    from flows.release import main as release_main

    params, _ = first_release
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a checkpoint" * 100)
    params_file = tmp_path / "params.json"
    params_file.write_text(params.model_dump_json())
    assert release_main(["--params-file", str(params_file), "--weights", str(garbage)]) == 1
    out, err = capsys.readouterr()
    assert "FAILED at export" in out and "not a readable PyTorch checkpoint" in out
    assert "Traceback" not in out + err and "(--debug shows the traceback)" in err
