"""The `cerebrium` deploy target end to end against the fake CLI: what it runs, where, with which
environment, and how it reads the CLI's answers. The "deployed app" is a real server started from
the staged bundle behind a local gateway, so readiness, the smoke test and the seed's
scripts/test_server.py run for real."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from flows.deploy.cerebrium import CerebriumError, deploy_cerebrium, parse_endpoint, resolve_cli
from flows.deploy import DeployError
from tests.deploy.conftest import APP_KEY, GATEWAY_JWT, PROJECT, SERVICE_TOKEN

REPO = Path(__file__).resolve().parents[2]


def deploy_error_step(excinfo) -> str:
    cause = excinfo.value.__cause__
    assert isinstance(cause, CerebriumError), excinfo.value
    return cause.step


def test_deploy_live_then_smoke_and_test_server(fake_cli, default_artifact, bundle_settings, images_dir):
    endpoint = deploy_cerebrium(default_artifact, bundle_settings, model_name="onnxship-classifier", version="3")

    # the URL the CLI printed, without the "{function_name}" placeholder
    assert endpoint.url == fake_cli.gateway.endpoint()
    assert endpoint.target == "cerebrium"
    assert endpoint.api_key == APP_KEY and endpoint.gateway_token == GATEWAY_JWT
    assert endpoint.details["project_id"] == PROJECT
    assert endpoint.details["app_id"] == f"{PROJECT}-onnxship-classifier"
    assert "cerebrium apps delete" in endpoint.stop_hint
    assert APP_KEY not in str(endpoint.public()) and GATEWAY_JWT not in str(endpoint.public())

    # how the CLI was run: `deploy -y` in the bundle, clean HOME, token in env, no docker config
    record = fake_cli.record()
    bundle = Path(endpoint.details["bundle"])
    assert record["argv"] == ["deploy", "-y"]
    assert Path(record["cwd"]) == bundle
    assert record["token"] == SERVICE_TOKEN
    assert record["home"] != os.environ["HOME"] and record["home_files"] == []
    assert record["docker_config"] is None
    assert record["other_secrets"] == []
    assert {"Dockerfile", "cerebrium.toml", "models/model.onnx", "serving/__main__.py",
            "requirements/serving-gpu.txt"} <= set(record["bundle_files"])
    assert not any("__pycache__" in f for f in record["bundle_files"])
    toml = tomllib.loads(record["toml"])["cerebrium"]
    assert toml["deployment"]["disable_auth"] is False
    assert toml["hardware"]["compute"] == bundle_settings.compute

    # the release's smoke test through the gateway (Bearer JWT for the gateway, X-API-Key for the app)
    from flows.reference import load_references
    from flows.stages.smoke import run_smoke_test

    references = load_references()
    result = run_smoke_test(endpoint.url, endpoint.api_key, references, latency_budget_s=10.0,
                            gateway_token=endpoint.gateway_token)
    # every image went through the gateway and got an answer (expected classes are the gate's and
    # the smoke test's business: they depend on the artifact, not on the transport)
    assert result.healthy and result.ready, result.failures
    assert result.checks and all(c.class_id is not None and c.label for c in result.checks), result.failures
    gateway_auth = {headers.get("Authorization") for _, _, headers in fake_cli.gateway.requests}
    assert gateway_auth == {f"Bearer {GATEWAY_JWT}"}

    # the seed's command against the "live" URL, plus the gateway JWT (Authorization: Bearer)
    image = next(p for p in sorted(images_dir.iterdir()) if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    command = [sys.executable, str(REPO / "scripts" / "test_server.py"), "--url", endpoint.url,
               "--api-key", APP_KEY, "--images", str(image)]
    run = subprocess.run([*command, "--gateway-token", GATEWAY_JWT], capture_output=True, text=True,
                         timeout=60, cwd=REPO)
    assert run.returncode == 0, run.stdout + run.stderr
    assert image.name in run.stdout

    # without the gateway JWT the platform refuses the call before it reaches the app
    env = {k: v for k, v in os.environ.items() if k != "CEREBRIUM_API_KEY"}
    run = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=REPO, env=env)
    assert run.returncode != 0 and "401" in run.stdout + run.stderr


@pytest.mark.parametrize(
    ("mode", "step", "says"),
    [
        ("build-failed", "build", "build failed with status: failed"),
        ("build-failed-exit0", "build", "the CLI exited 0"),
        ("cancelled", "cancelled", "Build cancelled"),
        ("not-logged-in", "auth", "CEREBRIUM_SERVICE_ACCOUNT_TOKEN"),
    ],
)
def test_cli_failures_are_named(fake_cli, default_artifact, bundle_settings, mode, step, says):
    fake_cli.configure(mode)
    with pytest.raises(DeployError) as excinfo:
        deploy_cerebrium(default_artifact, bundle_settings)
    assert deploy_error_step(excinfo) == step
    assert says in str(excinfo.value)
    assert fake_cli.app_pids() == []


def test_a_build_that_never_ends_is_cancelled(fake_cli, default_artifact, tmp_path):
    from flows.params import CerebriumSettings

    fake_cli.configure("hang")
    settings = CerebriumSettings(bundle_dir=tmp_path / "bundles", deploy_timeout_s=3)
    with pytest.raises(DeployError) as excinfo:
        deploy_cerebrium(default_artifact, settings)
    assert deploy_error_step(excinfo) == "build"
    assert "did not finish within 3 s" in str(excinfo.value)
    assert "Deployment cancelled" in str(excinfo.value)


def test_missing_cli_fails_in_preflight(fake_cli, default_artifact, bundle_settings, monkeypatch):
    monkeypatch.setenv("PATH", os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep)
                                              if p != str(fake_cli.bin_dir)))
    if resolve_cli_or_none() is not None:
        pytest.skip("a real cerebrium CLI is installed on this machine")
    with pytest.raises(DeployError) as excinfo:
        deploy_cerebrium(default_artifact, bundle_settings)
    assert deploy_error_step(excinfo) == "preflight"
    assert "pip install cerebrium && cerebrium version" in str(excinfo.value)
    assert not fake_cli.record_path.exists()


def test_pip_launcher_without_download_is_reported(fake_cli, tmp_path, monkeypatch):
    launcher_dir = tmp_path / "launcher"
    launcher_dir.mkdir()
    launcher = launcher_dir / "cerebrium"
    launcher.write_text(f"#!{sys.executable}\nimport sys\nfrom cerebrium_cli import main\nsys.exit(main())\n")
    launcher.chmod(0o755)
    monkeypatch.setenv("PATH", f"{launcher_dir}{os.pathsep}/usr/bin:/bin")
    with pytest.raises(CerebriumError, match="cerebrium version"):
        resolve_cli()


def resolve_cli_or_none():
    try:
        return resolve_cli()
    except CerebriumError:
        return None


def test_parse_endpoint_from_real_cli_output():
    output = (
        "✓ Build complete!\n\n\x1b[32m✓ my-app is now live!\x1b[0m\n\n"
        "App Dashboard: https://dashboard.cerebrium.ai/projects/p-abc123/apps/p-abc123-my-app\n\n"
        "Endpoint:\nPOST https://api.aws.us-east-1.cerebrium.ai/v4/p-abc123/my-app/{function_name}\n"
    )
    assert parse_endpoint(output, "my-app") == ("https://api.aws.us-east-1.cerebrium.ai/v4/p-abc123/my-app", "p-abc123")
    assert parse_endpoint("POST https://api.cerebrium.ai/v4/p-x/my-app/predict", "my-app")[0] == \
        "https://api.cerebrium.ai/v4/p-x/my-app"
    assert parse_endpoint(output, "other-app") is None
