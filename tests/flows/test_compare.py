"""`python -m flows.compare`: two versions side by side, from their release runs, on a real sqlite store."""

from __future__ import annotations

from urllib.parse import unquote

import pytest

from flows import registry
from flows.compare import main as compare_main

NAME = "cmp-model"


@pytest.fixture(scope="module")
def store(tmp_path_factory, default_artifact):
    """Two promoted releases whose runs differ in one parameter and in their figures."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('compare')}/mlruns/mlflow.db"
    client = registry.connect(uri)
    experiment_id = registry.ensure_experiment(client, NAME)
    runs = []
    for opset, p95 in (("19", 20.0), ("20", 25.0)):
        run_id = registry.start_run(client, experiment_id, "release", {})
        registry.log_params(client, run_id, {"opset": opset, "arch": "efficientnet_lite0"})
        registry.log_metrics(client, run_id, {"benchmark/ort_b1_p95_ms": p95, "parity/top1_agreement": 1.0})
        version = registry.register_release(client, NAME, experiment_id, run_id, default_artifact, {}).version
        registry.end_run(client, run_id)
        registry.promote(client, NAME, version)
        runs.append(run_id)
    return uri, runs


def test_champion_against_previous_by_default(store, capsys):
    uri, (first, second) = store
    assert compare_main(["--model-name", NAME, "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out
    header = out.splitlines()[0]
    assert header.index("v2 @candidate @champion") < header.index("v1 @previous")
    opset = next(line for line in out.splitlines() if line.strip().startswith("opset"))
    assert opset.split()[1:] == ["20", "19"]  # the differing parameter, champion first
    assert "arch" not in out.split("benchmark")[0].replace("parameters that differ", "")  # equal params are left out
    p95 = next(line for line in out.splitlines() if "benchmark/ort_b1_p95_ms" in line)
    assert p95.split()[1:] == ["25", "20", "-20.0%"]
    link = unquote(out.split("then open ")[1].strip())
    assert "#/compare-runs?runs=" in link and second in link and first in link
    assert link.endswith("&workflowType=machine_learning")  # MLflow 3's UI would open in its GenAI mode


def test_versions_by_number_and_unknown_alias(store, capsys):
    uri, _ = store
    assert compare_main(["1", "2", "--model-name", NAME, "--tracking-uri", uri]) == 0
    p95 = next(line for line in capsys.readouterr().out.splitlines() if "benchmark/ort_b1_p95_ms" in line)
    assert p95.split()[1:] == ["20", "25", "+25.0%"]
    assert compare_main(["staging", "--model-name", NAME, "--tracking-uri", uri]) == 2
    assert "no alias 'staging'" in capsys.readouterr().err
