"""The benchmark commands of the README run end to end (what they measure is never asserted: timings
belong in benchmark runs, not in tests)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

from tests.serving.conftest import REPO_ROOT


def run_bench(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "benchmarks.bench", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=timeout)


def test_benchmark_measures_all_three_systems_without_errors(default_artifact, null_artifact, tmp_path):
    """A variant (here the null twin) on the server, the fp32 artifact in the ceiling and the baseline."""
    from serving.artifact import file_sha256

    report = tmp_path / "bench.json"
    result = run_bench("--model", str(null_artifact), "--baseline-model", str(default_artifact), "--concurrency",
                       "1", "4", "--duration", "1", "--warmup", "0.3", "--max-images", "6", "--json", str(report))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    data = json.loads(report.read_text())
    levels = {(row["system"][0], row["concurrency"]): row for row in data["levels"]}
    assert set(levels) == {(system, c) for system in "abc" for c in (1, 4)}
    assert all(row["requests"] > 0 and row["errors"] == 0 for row in levels.values()), data["levels"]
    assert data["summary"]["b"]["vs_ceiling"] > 0 and data["summary"]["b"]["vs_baseline"] > 0
    for line in ("x the in-process ceiling", "lone-client p50", "| b: onnxship server | 4 |",
                 "over the baseline (--baseline-model), best concurrency each", "(target >= 1.25)"):
        assert line in result.stdout
    models = data["models"]
    assert models["b"]["sha256"] == file_sha256(null_artifact) and models["b"]["startup"]["ready_after_s"] > 0
    assert models["a"]["file"] == models["c"]["file"] == default_artifact.name


def test_null_mode_splits_the_cpu_per_image(default_artifact, tmp_path):
    report = tmp_path / "null.json"
    result = run_bench("--model", str(default_artifact), "--null", "--concurrency", "1", "2", "--duration", "1",
                       "--warmup", "0.3", "--max-images", "6", "--json", str(report))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    data = json.loads(report.read_text())
    systems = {row["system"][:2] for row in data["levels"]}
    assert systems == {"a:", "b:"}, systems
    assert all(row["requests"] > 0 and row["errors"] == 0 for row in data["levels"]), data["levels"]
    split = data["summary"]["b"]["cpu_split_ms"]
    assert set(split) == {"decode", "http", "handoff"} and split["decode"] > 0
    assert "lone_added_ms" in data["summary"]["b"]
    for line in ("CPU ms per image", "lone client p50", "x the in-process ceiling"):
        assert line in result.stdout

    # the GPU check's report carries the same run as its host-overhead table
    from benchmarks.gpu_report import main as gpu_report

    out = tmp_path / "gpu-check"
    out.mkdir()
    (out / "plan.tsv").write_text("")
    assert gpu_report([str(out)]) == 0 and "Host overhead: no result" in (out / "gpu-check.md").read_text()
    (out / "host-overhead.json").write_text(report.read_text())
    assert gpu_report([str(out)]) == 0
    host = json.loads((out / "gpu-check.json").read_text())["host_overhead"]
    assert host["vs_ceiling"] == data["summary"]["b"]["vs_ceiling"] and host["ceiling_img_s"] > 0
    assert host["cpu_ms_per_image"] == split
    assert f"| {host['ceiling_img_s']} | {host['best_img_s']} |" in (out / "gpu-check.md").read_text()


def test_null_artifact_keeps_the_contract(default_artifact, tmp_path):
    from benchmarks.null_artifact import build_null_artifact
    from serving.artifact import read_metadata
    from serving.runtime import Classifier

    null = build_null_artifact(default_artifact, tmp_path / "null.onnx")
    real_md, null_md = read_metadata(default_artifact), read_metadata(null)
    assert null_md.labels == real_md.labels and null_md.input_size == real_md.input_size
    assert null_md.resize_policy == real_md.resize_policy and null_md.arch.startswith("null(")
    classifier = Classifier(null, device="cpu", intra_op_threads=1)
    size = null_md.input_size
    logits, probabilities = classifier.run(np.zeros((3, size, size, 3), np.uint8))
    assert logits.shape == probabilities.shape == (3, real_md.num_classes)
    assert np.allclose(probabilities.sum(axis=1), 1, atol=1e-5)


def test_gpu_replica_flags_give_a_cpu_server_the_cuda_defaults():
    from benchmarks.bench import gpu_replica_args
    from serving.config import load_config

    emulated = load_config(["--model", "m.onnx", "--no-auth", *gpu_replica_args()], {}).resolved("cpu")
    cuda = load_config(["--model", "m.onnx", "--no-auth"], {}).resolved("cuda")
    for setting in ("workers", "max_batch_size", "batch_timeout", "api_servers", "worker_sched"):
        assert getattr(emulated, setting) == getattr(cuda, setting), setting
    assert emulated.batch_timeout > 0 and emulated.workers == 1  # what makes it differ from the CPU defaults
    assert emulated.worker_sched == "batch" != load_config(["--model", "m.onnx", "--no-auth"], {}).resolved("cpu").worker_sched
