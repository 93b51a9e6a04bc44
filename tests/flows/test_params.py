"""Bad input fails in seconds, before any export, with a message naming the problem."""

from __future__ import annotations

import os
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
                         "--state-dir", str(tmp_path / "state")])
    assert code == 2
    assert "unknown arch 'nope'" in capsys.readouterr().err
    assert not (tmp_path / "m" / "mlflow.db").exists()  # nothing registered, not even a store


# ---------------------------------------------------------------- the typed command line


def test_every_parameter_is_a_flag_with_help(capsys):
    assert release_main(["--help"]) == 0
    text = capsys.readouterr().out
    for flag in ("--arch", "--random-init", "--gate.min-accuracy", "--benchmark.batch-sizes", "--server.port",
                 "--port", "--cerebrium.compute", "--smoke.latency-budget-s", "--debug", "--params-file"):
        assert flag in text, flag
    assert "top-1 on the reference images" in text  # the field's description is the flag's help


def test_flags_build_the_same_params_as_the_flow_takes(tmp_path):
    from flows.cli import parse_command

    params_file = tmp_path / "p.json"
    params_file.write_text('{"gate": {"min_accuracy": 0.9, "max_p95_latency_ms": 100}, "arch": "resnet34"}')
    params, debug = parse_command(["--arch", "resnet18", "--random-init", "--gate.min-accuracy", "0.5", "--port", "9000",
                                   "--benchmark.batch-sizes", "1,2", "--params-file", str(params_file), "--debug"])
    assert isinstance(params, ReleaseParams) and type(params) is ReleaseParams and debug is True
    assert (params.arch, params.random_init, params.server.port, params.benchmark.batch_sizes) == ("resnet18", True, 9000, (1, 2))
    assert (params.gate.min_accuracy, params.gate.max_p95_latency_ms) == (0.5, 100)  # flags over the file


@pytest.mark.parametrize("argv, words", [
    (["--gate.min-accuracy", "1.5"], ["--gate.min-accuracy", "less than or equal to 1", "1.5"]),
    (["--port", "70000"], ["--server.port (--port)", "65535"]),
    (["--benchmark.batch-sizes", "0,4"], ["--benchmark.batch-sizes", "positive"]),
    (["--no-such-flag", "1"], ["--no-such-flag"]),
    (["--params-file", "/nonexistent/p.json"], ["--params-file", "cannot be read"]),
])
def test_bad_values_name_the_flag_and_exit_2(argv, words, capsys):
    assert release_main(argv) == 2
    err = capsys.readouterr().err
    for word in words:
        assert word in err, err


def test_environment_variables_are_not_parameters(monkeypatch):
    from flows.cli import parse_command

    monkeypatch.setenv("ARCH", "resnet50")  # make exports its command-line variables into recipes
    monkeypatch.setenv("TARGET", "cerebrium")
    params, _ = parse_command([])
    assert (params.arch, params.target) == ("efficientnet_lite0", "local")


def test_make_prefect_targets_say_when_no_server_answers(repo_root, free_port):
    """`make prefect-run` against a URL where nothing listens: one clear line and exit 2, no hang."""
    import subprocess

    env = {**os.environ, "PREFECT_API_URL": f"http://127.0.0.1:{free_port()}/api"}
    done = subprocess.run(["make", "-s", "prefect-run"], cwd=repo_root, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2
    assert "error: no Prefect server answers at http://127.0.0.1:" in done.stderr and "make prefect-server" in done.stderr
