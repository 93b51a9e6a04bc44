"""The release flow with target=cerebrium (fake CLI, real everything else): a candidate that
deploys but fails its smoke test never becomes @champion."""

from __future__ import annotations

from pathlib import Path

import pytest
from support import free_port

from flows import registry
from flows.params import ReleaseParams


def seed_champion(tracking_uri: str, name: str, artifact: Path) -> str:
    client = registry.connect(tracking_uri)
    experiment = registry.ensure_experiment(client, name)
    run_id = registry.start_run(client, experiment, "seed champion", {})
    version = registry.register_release(client, name, experiment, run_id, artifact, {}).version
    registry.end_run(client, run_id)
    registry.promote(client, name, version)
    return version


def test_failing_smoke_test_after_deploy_keeps_champion(fake_cli, default_artifact, prefect_harness, tmp_path):
    from flows.release import ReleaseFailed, release

    tracking_uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    name = "onnxship-classifier"
    champion = seed_champion(tracking_uri, name, default_artifact)
    # the app's secret API_KEY in the dashboard differs from the key the flow holds: the deploy
    # succeeds and the app becomes ready, but every prediction answers 401
    fake_cli.configure("live", app_env={**_app_env(fake_cli), "API_KEY": "a-key-that-differs"})
    params = ReleaseParams.model_validate({
        "target": "cerebrium",
        "model_name": name,
        "tracking_uri": tracking_uri,
        "output_dir": str(tmp_path / "models"),
        "state_dir": str(tmp_path / "state"),
        "server": {"port": free_port()},
        "benchmark": {"batch_sizes": [1], "duration_s": 0.05, "warmup_calls": 1, "include_torch": False},
        "gate": {"max_latency_regression_pct": 10000, "max_p95_latency_ms": 60000},
        "smoke": {"latency_budget_s": 30},
        "cerebrium": {"bundle_dir": str(tmp_path / "bundles"), "ready_timeout_s": 90, "deploy_timeout_s": 120},
    })
    with pytest.raises(ReleaseFailed) as excinfo:
        release(params)
    assert "smoke" in str(excinfo.value).lower()

    record = fake_cli.record()
    assert record["argv"] == ["deploy", "-y"] and fake_cli.app_pids(), "the deploy itself must have happened"
    client = registry.connect(tracking_uri)
    aliases = registry.aliases(client, name)
    assert aliases.get("champion") == champion
    assert aliases.get("candidate") not in (None, champion)
    assert "previous" not in aliases
    from serving.artifact import file_sha256

    champion_file = registry.download_version(client, name, champion, tmp_path / "champion")
    last = fake_cli.record()
    assert file_sha256(champion_file)[:12] in last["cwd"], "the champion must be redeployed to serve again"
    assert len(last["app_pids"]) == 2, "candidate deploy, then the champion's redeploy"


def _app_env(fake_cli) -> dict:
    import json

    return json.loads(fake_cli.config_path.read_text())["app_env"]
