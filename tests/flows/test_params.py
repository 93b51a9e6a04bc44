"""Bad input fails in seconds, before any export, with a message naming the problem."""

from __future__ import annotations

import socket

import pytest
from support import free_port
from pydantic import ValidationError

from flows.params import ParameterError, ReleaseParams
from flows.validate import validate_release_params
from flows.release import main as release_main


def params(tmp_path, **overrides) -> ReleaseParams:
    data = {"tracking_uri": f"sqlite:///{tmp_path}/mlruns/mlflow.db", "state_dir": str(tmp_path / "state"),
            "output_dir": str(tmp_path / "models"), "server": {"port": free_port()}}
    data.update(overrides)
    return ReleaseParams.model_validate(data)


def problems(p: ReleaseParams) -> str:
    with pytest.raises(ParameterError) as info:
        validate_release_params(p)
    return str(info.value)


def test_defaults_are_valid(tmp_path):
    validate_release_params(params(tmp_path))


def test_unknown_arch(tmp_path):
    assert "unknown arch 'resnet999'" in problems(params(tmp_path, arch="resnet999"))


def test_custom_arch_that_does_not_import(tmp_path):
    assert "cannot import module 'no_such_pkg.models'" in problems(params(tmp_path, arch="no_such_pkg.models:build"))


def test_resnet_without_weights_needs_a_file(tmp_path):
    assert "has no bundled weights" in problems(params(tmp_path, arch="resnet18"))


def test_missing_and_empty_weights(tmp_path):
    assert "no such file" in problems(params(tmp_path, weights=str(tmp_path / "nope.pth")))
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    assert "empty file" in problems(params(tmp_path, weights=str(empty)))


def test_empty_manifest(tmp_path, images_dir):
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("file,class_index\n")
    text = problems(params(tmp_path, images_dir=str(images_dir), manifest=str(manifest)))
    assert str(manifest) in text


def test_malformed_manifest(tmp_path, images_dir):
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("file,class_index\nchelsea.png,not-a-number\n")
    assert str(manifest) in problems(params(tmp_path, images_dir=str(images_dir), manifest=str(manifest)))


def test_manifest_naming_missing_files(tmp_path, images_dir):
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("file,class_index\nchelsea.png,285\nghost.png,1\n")
    assert "ghost.png" in problems(params(tmp_path, images_dir=str(images_dir), manifest=str(manifest)))


def test_missing_manifest(tmp_path):
    assert "no such file" in problems(params(tmp_path, manifest=str(tmp_path / "none.csv")))


def test_unknown_deploy_target(tmp_path):
    assert "unknown deploy target 'kubernetes'" in problems(params(tmp_path, target="kubernetes"))


def test_cerebrium_target_without_token_fails_up_front(tmp_path, monkeypatch):
    monkeypatch.delenv("CEREBRIUM_SERVICE_ACCOUNT_TOKEN", raising=False)
    text = problems(params(tmp_path, target="cerebrium"))
    assert "deploy target 'cerebrium' is not ready" in text and "CEREBRIUM_SERVICE_ACCOUNT_TOKEN" in text


def test_port_in_use(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        text = problems(params(tmp_path, server={"port": port}))
    assert f"port {port}" in text and "already in use" in text


def test_unwritable_mlflow_store(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the store's directory should be")
    text = problems(params(tmp_path, tracking_uri=f"sqlite:///{blocker}/mlflow.db"))
    assert "MLflow store" in text and "is a file" in text


def test_every_problem_is_listed_at_once(tmp_path):
    text = problems(params(tmp_path, arch="nope", target="nowhere"))
    assert "unknown arch" in text and "unknown deploy target" in text


def test_shape_errors_come_from_pydantic():
    with pytest.raises(ValidationError):
        ReleaseParams.model_validate({"benchmark": {"batch_sizes": [0]}})
    with pytest.raises(ValidationError):
        ReleaseParams.model_validate({"no_such_field": 1})


def test_cli_exits_2_before_starting_anything(tmp_path, capsys):
    code = release_main(["--arch", "nope", "--tracking-uri", f"sqlite:///{tmp_path}/m/mlflow.db",
                         "--params", '{"state_dir": "%s"}' % (tmp_path / "state")])
    assert code == 2
    assert "unknown arch 'nope'" in capsys.readouterr().err
    assert not (tmp_path / "m" / "mlflow.db").exists()  # nothing registered, not even a store
