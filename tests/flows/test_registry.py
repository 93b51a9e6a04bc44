"""MLflow registry on a real sqlite store: versions, aliases as roles, rollback."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows import registry
from serving.artifact import file_sha256


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("registry")


@pytest.fixture
def store(store_dir, request):
    """One sqlite store per module (creating one takes seconds); one experiment per test."""
    client = registry.connect(f"sqlite:///{store_dir}/mlruns/mlflow.db")
    experiment_id = registry.ensure_experiment(client, request.node.name)
    return client, experiment_id


def register(client, experiment_id, artifact: Path, name: str = "test-model") -> str:
    name = name + "-" + experiment_id
    run_id = registry.start_run(client, experiment_id, "release", {})
    version = registry.register_release(client, name, experiment_id, run_id, artifact, {"gate.verdict": "pending"})
    registry.end_run(client, run_id)
    return version.version


def test_store_and_artifacts_live_together(store, store_dir, tmp_path, default_artifact):
    client, experiment_id = store
    artifacts = store_dir / "mlruns" / "artifacts"
    assert client.get_experiment(experiment_id).artifact_location == artifacts.as_uri()
    version = register(client, experiment_id, default_artifact)
    run_id = client.get_model_version(f"test-model-{experiment_id}", version).run_id
    model_id = client.search_logged_models([experiment_id])[0].model_id
    onnx_file = artifacts / "models" / model_id / "artifacts" / "model.onnx"
    assert file_sha256(onnx_file) == file_sha256(default_artifact)  # single file, byte for byte
    assert "onnxruntime==" in (onnx_file.parent / "requirements.txt").read_text()
    assert not (store_dir / "mlruns" / "0").exists() and not (tmp_path / "mlruns").exists()  # nothing strays
    assert run_id

    path = registry.download_version(client, f"test-model-{experiment_id}", version, tmp_path / "dl")
    assert file_sha256(path) == file_sha256(default_artifact)


def test_aliases_move_as_roles_and_rollback_swaps(store, default_artifact):
    client, experiment_id = store
    name = f"test-model-{experiment_id}"
    v1 = register(client, experiment_id, default_artifact)
    assert registry.aliases(client, name) == {"candidate": v1}
    assert registry.promote(client, name, v1) is None
    v2 = register(client, experiment_id, default_artifact)
    assert registry.aliases(client, name) == {"candidate": v2, "champion": v1}
    assert registry.promote(client, name, v2) == v1
    assert registry.aliases(client, name) == {"candidate": v2, "champion": v2, "previous": v1}
    assert registry.version_aliases(client, name, v1) == ["previous"]

    assert registry.rollback(client, name) == (v2, v1)
    assert registry.aliases(client, name) == {"candidate": v2, "champion": v1, "previous": v2}
    assert client.get_model_version(name, v2).tags["rolled_back"] == "true"
    assert registry.rollback(client, name) == (v1, v2)  # run twice: undone
    assert registry.alias_version(client, name, "champion") == v2


def test_rollback_without_previous_is_a_clear_error(store, default_artifact):
    client, experiment_id = store
    name = f"test-model-{experiment_id}"
    registry.promote(client, name, register(client, experiment_id, default_artifact))
    with pytest.raises(registry.RegistryError, match="no @previous version"):
        registry.rollback(client, name)


def test_tracking_uri_default_and_override(monkeypatch):
    from serving.model_uri import DEFAULT_TRACKING_URI

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert registry.resolve_tracking_uri() == DEFAULT_TRACKING_URI == "sqlite:///mlruns/mlflow.db"
    assert registry.local_store_paths(DEFAULT_TRACKING_URI) == [Path("mlruns/mlflow.db"), Path("mlruns/artifacts")]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.team:5000")
    assert registry.resolve_tracking_uri() == "http://mlflow.team:5000"
    assert registry.local_store_paths("http://mlflow.team:5000") == []
    assert registry.resolve_tracking_uri("sqlite:///x.db") == "sqlite:///x.db"


def test_role_tags_stay_true_when_aliases_move(store, default_artifact):
    client, experiment_id = store
    name = f"test-model-{experiment_id}"

    def roles():
        return {str(mv.version): mv.tags.get("role") for mv in client.search_model_versions(f"name='{name}'")}

    v1 = register(client, experiment_id, default_artifact)
    assert roles() == {v1: "candidate"}
    registry.tag_version(client, name, v1, {"release.outcome": "promoted"})
    registry.promote(client, name, v1)
    v2 = register(client, experiment_id, default_artifact)
    registry.tag_version(client, name, v2, {"release.outcome": "promoted"})
    registry.promote(client, name, v2)
    v3 = register(client, experiment_id, default_artifact)
    registry.tag_version(client, name, v3, {"release.outcome": "rejected"})
    assert registry.sync_roles(client, name) == {v1: "previous", v2: "champion", v3: "rejected"}
    assert roles() == {v1: "previous", v2: "champion", v3: "rejected"}
    registry.rollback(client, name)
    assert roles() == {v1: "champion", v2: "previous", v3: "rejected"}
    v4 = register(client, experiment_id, default_artifact)
    registry.tag_version(client, name, v4, {"release.outcome": "promoted"})
    registry.promote(client, name, v4)  # v2 was @previous and is now nothing: a former champion
    assert roles() == {v1: "previous", v2: "retired", v3: "rejected", v4: "champion"}


def test_a_release_killed_mid_way_leaves_no_run_running(store, tmp_path):
    """The next release marks the run of a release whose process is gone KILLED (same host only)."""
    import socket

    from flows.params import ReleaseParams
    from flows.record import ReleaseRun

    client, experiment_id = store
    name = client.get_experiment(experiment_id).name
    dead = registry.start_run(client, experiment_id, "killed release", {
        "onnxship.release": "true", "release.host": socket.gethostname(), "release.pid": "999999999"})
    elsewhere = registry.start_run(client, experiment_id, "a release on another machine", {
        "onnxship.release": "true", "release.host": "another-host", "release.pid": "999999999"})
    run = ReleaseRun(ReleaseParams(tracking_uri=client.tracking_uri, experiment=name))
    assert client.get_run(dead).info.status == "KILLED"
    assert client.get_run(dead).data.tags["release.outcome"] == "abandoned"
    assert client.get_run(elsewhere).info.status == "RUNNING"
    assert client.get_run(run.run_id).info.status == "RUNNING"
