"""The benchmark stage says when its figures were taken on a busy machine."""

from __future__ import annotations

import os
import subprocess
import sys

from flows.report import ReleaseSummary, build_console, build_markdown
from flows.stages.benchmark import benchmark_artifact
from serving.runtime import Classifier


def test_figures_taken_beside_busy_programs_carry_a_warning(default_artifact, images_dir):
    """One busy loop per core competes with the benchmark: the result, the MLflow metric, the
    markdown report and the console summary all say that other programs used the CPU meanwhile."""
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(min(os.cpu_count() or 1, 32))]
    try:
        result = benchmark_artifact(Classifier(default_artifact, device="cpu"), [images_dir / "coffee.png"],
                                    batch_sizes=(1,), duration_s=1.0, warmup_calls=1)
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait(timeout=10)
    assert result.machine_was_busy, result.others_cpu_share
    assert result.metrics()["benchmark/other_programs_cpu_pct"] > 25
    summary = ReleaseSummary("onnxship-test", "local", "sqlite:///mlruns/mlflow.db", benchmark=result.to_dict())
    assert "other programs used" in build_markdown(summary)
    assert "note: other programs used" in build_console(summary, None)
