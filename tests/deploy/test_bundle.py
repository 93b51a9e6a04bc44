"""cerebrium.toml rendering, bundle staging and preflight: everything that must fail in seconds,
before an upload and a 10-minute remote build."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest

from flows.deploy.cerebrium import bundle as cb_bundle
from flows.deploy.cerebrium import contract as cb
from flows.deploy.cerebrium import CerebriumError, preflight, prerequisite_problems, render_toml, stage_bundle, upload_files
from flows.deploy.cerebrium.command import main as cerebrium_main
from flows.params import CerebriumSettings
from serving.artifact import file_sha256
from tests.deploy.conftest import SERVICE_TOKEN, make_jwt

REPO = Path(__file__).resolve().parents[2]


def test_toml_from_settings_matches_cerebrium_schema():
    settings = CerebriumSettings(app_name="my-app", compute="HOPPER_H100", gpu_count=2, cpu=8, memory=64.0,
                                 region="eu-north-1", min_replicas=1, max_replicas=5, cooldown=120,
                                 replica_concurrency=96, response_grace_period=30)
    doc = tomllib.loads(render_toml(settings))["cerebrium"]
    assert set(doc) == {"deployment", "runtime", "hardware", "scaling"}
    assert doc["deployment"] == {"name": "my-app", "include": cb.INCLUDE, "exclude": cb.EXCLUDE, "disable_auth": False}
    from serving.config import ServerConfig

    assert doc["runtime"]["custom"] == {"dockerfile_path": "./Dockerfile", "port": ServerConfig().port,
                                        "healthcheck_endpoint": "/health", "readycheck_endpoint": "/ready"}
    assert doc["hardware"] == {"compute": "HOPPER_H100", "gpu_count": 2, "cpu": 8.0, "memory": 64.0,
                               "provider": "aws", "region": "eu-north-1"}
    assert doc["scaling"] == {"min_replicas": 1, "max_replicas": 5, "cooldown": 120, "replica_concurrency": 96,
                              "response_grace_period": 30}


def test_root_toml_is_the_default_rendering():
    """The checked-in cerebrium.toml (manual `cerebrium deploy`) says what the release flow renders."""
    root = tomllib.loads((REPO / "cerebrium.toml").read_text())
    assert root == tomllib.loads(render_toml(CerebriumSettings()))


def test_settings_are_validated():
    with pytest.raises(ValueError):
        CerebriumSettings(app_name="Not_A_Valid_Name")
    with pytest.raises(ValueError):
        CerebriumSettings(gpu_count=0)
    with pytest.raises(ValueError):
        CerebriumSettings(unknown_field=1)


def test_include_patterns_behave_like_the_cli(tmp_path):
    for rel in ("Dockerfile", "serving/api.py", "serving/sub/x.py", "serving/__pycache__/api.cpython-311.pyc",
                ".git/config", ".venv/lib/site.py", "models/model.onnx", "notes.txt", "serving/.hidden.py"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x")
    # Cerebrium's default exclude ".*" does not skip the contents of .git/ or .venv/ ...
    assert ".git/config" in upload_files(tmp_path, ["**"], [".*"])
    # ... the explicit include list and our excludes upload exactly what the image needs
    assert upload_files(tmp_path, cb.INCLUDE, cb.EXCLUDE) == [
        "Dockerfile", "models/model.onnx", "serving/api.py", "serving/sub/x.py"]


def test_stage_bundle(default_artifact, tmp_path):
    settings = CerebriumSettings(bundle_dir=tmp_path, cuda="12", max_batch_size=8, workers=2)
    bundle = stage_bundle(default_artifact, settings, model_name="onnxship-classifier", version="7")
    sha = file_sha256(default_artifact)
    assert bundle.path == tmp_path / f"onnxship-classifier-{sha[:12]}"
    assert bundle.artifact_sha256 == sha
    assert set(bundle.files) >= {"Dockerfile", "models/model.onnx", "requirements/serving-gpu.txt", "serving/__main__.py"}
    assert not any(f.startswith(("flows/", "tests/", "scripts/")) or f.endswith((".pyc", ".json")) for f in bundle.files)
    facts = cb_bundle.dockerfile_facts((bundle.path / "Dockerfile").read_text())
    assert facts["args"]["MODEL_SHA256"] == sha
    assert (facts["args"]["WORKERS"], facts["args"]["MAX_BATCH_SIZE"], facts["args"]["MODEL_VERSION"]) == ("2", "8", "7")
    # everything but the pinned ARG lines is the repository's Dockerfile
    strip = [line for line in (REPO / "Dockerfile").read_text().splitlines() if not line.startswith("ARG ")]
    assert [line for line in (bundle.path / "Dockerfile").read_text().splitlines() if not line.startswith("ARG ")] == strip
    manifest = json.loads((bundle.path / "bundle.json").read_text())
    assert manifest["artifact_sha256"] == sha and manifest["upload_files"] == bundle.files
    # staging again replaces the bundle; a directory that is not a bundle is never overwritten
    assert stage_bundle(default_artifact, settings).path == bundle.path
    stranger = tmp_path / "mine"
    stranger.mkdir()
    (stranger / "precious.txt").write_text("keep")
    with pytest.raises(CerebriumError, match="refusing to overwrite"):
        stage_bundle(default_artifact, settings, out_dir=stranger)
    assert (stranger / "precious.txt").read_text() == "keep"


def test_stage_refuses_an_artifact_that_is_not_the_registered_one(default_artifact, tmp_path):
    with pytest.raises(CerebriumError, match="changed after registration"):
        stage_bundle(default_artifact, CerebriumSettings(bundle_dir=tmp_path), expected_sha256="0" * 64)


def test_preflight_passes_on_a_fresh_bundle(fake_cli, default_artifact, bundle_settings):
    bundle = stage_bundle(default_artifact, bundle_settings)
    notes = preflight(bundle, SERVICE_TOKEN)
    assert any(note.startswith("upload:") for note in notes)
    assert any(str(fake_cli.bin_dir) in note for note in notes)


def _edit_toml(bundle, old: str, new: str) -> None:
    path = bundle.path / "cerebrium.toml"
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


BREAKAGES = {
    "port": (lambda b: _edit_toml(b, "port = 8192", "port = 8000"), "port 8000"),
    "public": (lambda b: _edit_toml(b, "disable_auth = false", "disable_auth = true"), "disable_auth must be false"),
    "probe path": (lambda b: _edit_toml(b, 'readycheck_endpoint = "/ready"', 'readycheck_endpoint = "/readyz"'),
                   "no route /readyz"),
    "dockerfile path": (lambda b: _edit_toml(b, 'dockerfile_path = "./Dockerfile"', 'dockerfile_path = "./Dockerfile.gpu"'),
                        "does not exist"),
    "include": (lambda b: (b.path / "requirements" / "serving-gpu.txt").unlink(), "serving-gpu.txt"),
    "copy source": (lambda b: _edit_toml(b, '"models/model.onnx",\n]', '"models/*.bin",\n]'), "COPYs models/model.onnx"),
    "artifact changed": (lambda b: (b.path / "models" / "model.onnx").write_bytes(b"not the model"), "changed after staging"),
    "sha pin": (lambda b: (b.path / "Dockerfile").write_text(
        (b.path / "Dockerfile").read_text().replace(b.artifact_sha256, "1" * 64)), "pins MODEL_SHA256"),
    "root": (lambda b: (b.path / "Dockerfile").write_text(
        (b.path / "Dockerfile").read_text().replace("USER 10001:10001", "USER root")), "runs as root"),
    "grace shorter than the drain": (lambda b: setattr(b, "settings", b.settings.model_copy(
        update={"response_grace_period": 15})), "response_grace_period 15 s is shorter than the server's drain"),
}


@pytest.mark.parametrize("name", list(BREAKAGES))
def test_preflight_names_each_problem(fake_cli, default_artifact, bundle_settings, name):
    bundle = stage_bundle(default_artifact, bundle_settings)
    breakage, message = BREAKAGES[name]
    breakage(bundle)
    with pytest.raises(CerebriumError, match="preflight") as excinfo:
        preflight(bundle, SERVICE_TOKEN)
    assert message in str(excinfo.value)


@pytest.mark.parametrize(
    ("token", "message"),
    [
        (None, "no service-account token"),
        ("not-a-jwt", "is not a JWT"),
        (make_jwt({"project_id": "p-x", "exp": 1_000_000_000}), "expired"),
        (make_jwt({"sub": "user-123"}), "no project id"),
    ],
)
def test_preflight_checks_the_token(fake_cli, default_artifact, bundle_settings, token, message):
    bundle = stage_bundle(default_artifact, bundle_settings)
    with pytest.raises(CerebriumError, match=message):
        preflight(bundle, token)


def test_preflight_size_limit(fake_cli, default_artifact, bundle_settings, monkeypatch):
    bundle = stage_bundle(default_artifact, bundle_settings)
    monkeypatch.setattr(cb, "UPLOAD_LIMIT_BYTES", 1024)  # preflight reads contract.UPLOAD_LIMIT_BYTES
    with pytest.raises(CerebriumError, match="over Cerebrium's 2 GB limit"):
        preflight(bundle, SERVICE_TOKEN)


def test_preflight_lists_every_problem_at_once(fake_cli, default_artifact, bundle_settings, monkeypatch):
    bundle = stage_bundle(default_artifact, bundle_settings)
    _edit_toml(bundle, "port = 8192", "port = 9000")
    _edit_toml(bundle, "disable_auth = false", "disable_auth = true")
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(CerebriumError) as excinfo:
        preflight(bundle, None)
    text = str(excinfo.value)
    for fragment in ("port 9000", "disable_auth", "no service-account token", "pip install cerebrium"):
        assert fragment in text


def test_prerequisites_for_the_release_validation(fake_cli, monkeypatch):
    assert prerequisite_problems() == []
    monkeypatch.delenv("CEREBRIUM_SERVICE_ACCOUNT_TOKEN")
    monkeypatch.delenv("API_KEY")
    monkeypatch.setenv("PATH", "/nonexistent")
    problems = "\n".join(prerequisite_problems())
    for fragment in ("CEREBRIUM_SERVICE_ACCOUNT_TOKEN", "API_KEY", "pip install cerebrium"):
        assert fragment in problems


def test_command_line_stage_and_preflight(default_artifact, tmp_path, monkeypatch, capsys):
    out = tmp_path / "by-hand"
    assert cerebrium_main(["stage", str(default_artifact), "--out", str(out), "--compute", "ADA_L4"]) == 0
    assert f"staged {out}" in capsys.readouterr().out
    assert tomllib.loads((out / "cerebrium.toml").read_text())["cerebrium"]["hardware"]["compute"] == "ADA_L4"
    monkeypatch.delenv("CEREBRIUM_SERVICE_ACCOUNT_TOKEN", raising=False)
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cerebrium_main(["preflight", str(default_artifact), "--out", str(out)]) == 1
    assert "no service-account token" in capsys.readouterr().out
