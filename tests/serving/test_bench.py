"""The benchmark command of the README runs end to end: three systems, real JPEG bodies, ratios."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.serving.conftest import REPO_ROOT


def test_benchmark_measures_all_three_systems_without_errors(default_artifact, tmp_path):
    report = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, "-m", "serving.bench", "--model", str(default_artifact), "--concurrency", "1", "4",
         "--duration", "1", "--warmup", "0.3", "--max-images", "6", "--json", str(report)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    data = json.loads(report.read_text())
    levels = {(row["system"][0], row["concurrency"]): row for row in data["levels"]}
    assert set(levels) == {(system, c) for system in "abc" for c in (1, 4)}
    assert all(row["requests"] > 0 and row["errors"] == 0 for row in levels.values()), data["levels"]
    assert data["summary"]["b/a"] > 0 and data["summary"]["b/c"] > 0
    for line in ("b/a = ", "b/c = ", "| b: onnxship server | 4 |"):
        assert line in result.stdout
