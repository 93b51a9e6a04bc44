"""`models:/<name>@<alias>` resolves through a real MLflow registry (sqlite store in a tmp dir)."""

from __future__ import annotations

import pytest

from serving.artifact import file_sha256
from serving.model_uri import ModelUriError, resolve_model


def test_registry_alias_resolves_to_the_registered_file(default_artifact, tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    client = MlflowClient(tracking_uri=store, registry_uri=store)
    experiment = client.create_experiment("serving-test", artifact_location=(tmp_path / "artifacts").as_uri())
    run = client.create_run(experiment)
    client.log_artifact(run.info.run_id, str(default_artifact), artifact_path="model")
    client.set_terminated(run.info.run_id)
    client.create_registered_model("onnxship-test")
    version = client.create_model_version("onnxship-test", f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)
    client.set_registered_model_alias("onnxship-test", "champion", version.version)

    resolved = resolve_model("models:/onnxship-test@champion", dst_dir=tmp_path / "download")
    assert file_sha256(resolved.path) == file_sha256(default_artifact)
    assert (resolved.name, resolved.version, resolved.run_id, resolved.alias) == (
        "onnxship-test", str(version.version), run.info.run_id, "champion")
    with pytest.raises(ModelUriError, match="not found in the MLflow registry"):
        resolve_model("models:/onnxship-test@nobody")
