"""`python -m serving` start-up checks and shutdown: refuse loudly, stop cleanly on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.serving.conftest import REPO_ROOT, RunningServer, free_port, start_server, stop, wait_ready


def run_serving(*args: str, api_key: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("ONNXSHIP_") and k not in ("API_KEY", "MODEL_SHA256")}
    if api_key:
        env["API_KEY"] = api_key
    return subprocess.run([sys.executable, "-m", "serving", "--host", "127.0.0.1", "--port", str(free_port()), *args],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_refuses_to_start_without_api_key(default_artifact):
    result = run_serving("--model", str(default_artifact))
    assert result.returncode == 2
    assert "API_KEY" in result.stderr and "--no-auth" in result.stderr


def test_refuses_a_missing_model(tmp_path):
    result = run_serving("--model", str(tmp_path / "nope.onnx"), api_key="k")
    assert result.returncode == 2
    assert "no such model file" in result.stderr


def test_refuses_a_file_that_is_not_an_artifact(tmp_path):
    fake = tmp_path / "model.onnx"
    fake.write_bytes(b"not onnx at all")
    result = run_serving("--model", str(fake), api_key="k")
    assert result.returncode == 2
    assert "not a loadable ONNX model" in result.stderr


def test_refuses_a_model_whose_sha256_differs(default_artifact):
    result = run_serving("--model", str(default_artifact), "--expected-sha256", "0" * 64, api_key="k")
    assert result.returncode == 2
    assert "does not match the expected" in result.stderr


def test_device_cuda_without_gpu_is_an_error(default_artifact):
    from serving.runtime import cuda_available

    if cuda_available():
        pytest.skip("this machine has a usable GPU")
    result = run_serving("--model", str(default_artifact), "--device", "cuda", api_key="k")
    assert result.returncode == 2
    assert "--device cuda" in result.stderr


def test_no_auth_server_warns_serves_and_stops_on_sigterm(default_artifact, tmp_path, jpeg_bytes):
    from serving.artifact import file_sha256

    port = free_port()
    log_path = tmp_path / "server.log"
    process = start_server(default_artifact, log_path, "--port", str(port), "--workers", "1", "--no-auth",
                           api_key=None, env={"MODEL_SHA256": file_sha256(default_artifact)})
    server = RunningServer(f"http://127.0.0.1:{port}", process, log_path, None)
    try:
        wait_ready(server)
        # the fresh server's first requests arrive all at once (each HTTP process initialises its state)
        with ThreadPoolExecutor(16) as pool:
            first = list(pool.map(lambda _: requests.post(f"{server.url}/predict", files={"file": ("a.jpg", jpeg_bytes)},
                                                          timeout=60), range(16)))
        assert [r.status_code for r in first] == [200] * 16, [r.text for r in first if r.status_code != 200]
        assert "AUTHENTICATION DISABLED" in server.log()
        worker_pids = [w["pid"] for w in requests.get(f"{server.url}/model", timeout=10).json()["workers"]]
        assert worker_pids
        started = time.monotonic()
        assert stop(process) == 0, server.log()  # SIGTERM -> graceful shutdown, exit status 0
        assert time.monotonic() - started < 40
        assert "SIGTERM received" in server.log() and "drained" in server.log()
        for pid in worker_pids:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)


def test_sigint_stops_a_server_started_with_sigint_ignored(default_artifact, tmp_path):
    # a shell starts background jobs (`nohup python -m serving &`, CI scripts) with SIGINT ignored,
    # and Python keeps it ignored unless told otherwise: the image's STOPSIGNAL SIGINT did nothing
    port = free_port()
    log_path = tmp_path / "server.log"
    process = start_server(default_artifact, log_path, "--port", str(port), "--workers", "1", sigint_ignored=True)
    server = RunningServer(f"http://127.0.0.1:{port}", process, log_path, None)
    try:
        wait_ready(server)
        started = time.monotonic()
        assert stop(process, timeout=30, sig=signal.SIGINT) == 0, server.log()
        assert time.monotonic() - started < 30
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
