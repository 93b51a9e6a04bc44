"""Serving fixtures: a real `python -m serving` subprocess on a free port, stopped by PID."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image
from support import free_port

from serving.processes import stop_process_group

REPO_ROOT = Path(__file__).resolve().parents[2]
API_KEY = "test-key-0123456789"


@dataclass
class RunningServer:
    url: str
    process: subprocess.Popen
    log_path: Path
    api_key: str | None
    started: float = 0.0  # time.monotonic() just before the process was spawned

    @property
    def headers(self) -> dict:
        return {"X-API-Key": self.api_key} if self.api_key else {}

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def start_server(model: Path, log_path: Path, *args: str, api_key: str | None = API_KEY,
                 env: dict | None = None, sigint_ignored: bool = False) -> subprocess.Popen:
    """`sigint_ignored`: start it the way a shell starts a background job, SIGINT ignored."""
    environment = {k: v for k, v in os.environ.items()
                   if not k.startswith("ONNXSHIP_") and k not in ("API_KEY", "MODEL_SHA256")}
    environment["PYTHONUNBUFFERED"] = "1"
    if api_key:
        environment["API_KEY"] = api_key
    environment.update(env or {})
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "serving", "--model", str(model), "--host", "127.0.0.1", *args],
            cwd=REPO_ROOT, env=environment, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if sigint_ignored else None,
        )


def wait_ready(server: RunningServer, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise AssertionError(f"server exited with {server.process.returncode}:\n{server.log()}")
        try:
            if requests.get(f"{server.url}/ready", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.3)
    raise AssertionError(f"server not ready after {timeout} s:\n{server.log()}")


def stop(process: subprocess.Popen, timeout: float = 45.0, sig: int = signal.SIGTERM) -> int | None:
    """`sig` to the server's main process (a graceful drain); if it has not exited within `timeout`,
    SIGKILL its whole process group. Returns the exit status (None: it had to be killed)."""
    status = None
    if process.poll() is None:
        process.send_signal(sig)
        try:
            status = process.wait(timeout)
        except subprocess.TimeoutExpired:
            stop_process_group(process.pid, timeout=1, sig=signal.SIGKILL, reap_pid=False)
            process.wait(10)
    else:
        status = process.returncode
    stop_process_group(process.pid, timeout=10, reap_pid=False)  # anything left of the group
    return status


@contextlib.contextmanager
def running(model: Path, tmp_path: Path, *args: str, api_key: str | None = API_KEY, env: dict | None = None,
            ready: bool = True):
    """A server on a free port for one test, stopped (by PID) when the test ends."""
    port = free_port()
    log_path = tmp_path / f"server-{port}.log"
    process = start_server(model, log_path, "--port", str(port), *args, api_key=api_key, env=env)
    server = RunningServer(f"http://127.0.0.1:{port}", process, log_path, api_key)
    try:
        if ready:
            wait_ready(server)
        yield server
    finally:
        stop(process, timeout=30)


@pytest.fixture(scope="session")
def slow_artifact(default_artifact, tmp_path_factory) -> Path:
    """The default artifact's null twin that spends a long time per call whatever the batch (a big
    model's behaviour, cheap to build): 0.1-0.5 s on a busy machine, ~40 ms on a fast quiet CPU.
    Holds requests in flight for the overload and supervision tests."""
    from benchmarks.null_artifact import build_null_artifact

    return build_null_artifact(default_artifact, tmp_path_factory.mktemp("slow") / "slow.onnx", work=1536)


@pytest.fixture(scope="session")
def slower_artifact(default_artifact, tmp_path_factory) -> Path:
    """Twice `slow_artifact`'s work (~0.3 s per call even on a fast quiet CPU): for tests whose
    requests must still be in flight together, whatever the machine."""
    from benchmarks.null_artifact import build_null_artifact

    return build_null_artifact(default_artifact, tmp_path_factory.mktemp("slower") / "slower.onnx", work=3072)


@pytest.fixture(scope="session")
def null_artifact(default_artifact, tmp_path_factory) -> Path:
    from benchmarks.null_artifact import build_null_artifact

    return build_null_artifact(default_artifact, tmp_path_factory.mktemp("null") / "null.onnx")


@pytest.fixture(scope="session")
def server(default_artifact, tmp_path_factory) -> RunningServer:
    """One server for the serving tests: 2 workers, batching that waits 50 ms for company."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    started = time.monotonic()
    process = start_server(default_artifact, log_path, "--port", str(port), "--workers", "2",
                           "--max-batch-size", "8", "--batch-timeout", "0.05", "--max-payload-bytes", "2000000",
                           "--model-name", "onnxship-test", "--model-version", "7", "--model-run-id", "run123",
                           "--header-timeout", "2", "--body-timeout", "2")
    running = RunningServer(f"http://127.0.0.1:{port}", process, log_path, API_KEY, started)
    try:
        wait_ready(running)
        yield running
    finally:
        stop(process)


# ---------------------------------------------------------------- awkward images, made with PIL


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


@pytest.fixture(scope="session")
def photo(images_dir) -> Image.Image:
    return Image.open(images_dir / "chelsea.png").convert("RGB")


@pytest.fixture(scope="session")
def jpeg_bytes(photo) -> bytes:
    return encode(photo, "JPEG", quality=90)


def decompression_bomb_png(width: int = 30000, height: int = 30000) -> bytes:
    """A tiny PNG whose header claims width x height pixels (never decodable in memory)."""
    small = encode(Image.new("L", (1, 1)), "PNG")
    ihdr_at = small.index(b"IHDR")
    fields = bytearray(small[ihdr_at + 4: ihdr_at + 17])
    fields[0:8] = struct.pack(">II", width, height)
    chunk = b"IHDR" + bytes(fields)
    crc = struct.pack(">I", zlib.crc32(chunk) & 0xFFFFFFFF)
    return small[: ihdr_at] + chunk + crc + small[ihdr_at + 17 + 4:]


@pytest.fixture(scope="session")
def awkward_images(photo) -> dict[str, bytes]:
    """Images a phone, a scanner or an editor produce; every one must classify."""
    gray16 = np.asarray(photo.convert("L"), dtype=np.uint16) * 257
    rgba = photo.convert("RGBA")
    rgba.putalpha(200)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 CW to display
    return {
        "grayscale.png": encode(photo.convert("L"), "PNG"),
        "cmyk.jpg": encode(photo.convert("CMYK"), "JPEG"),
        "rgba.png": encode(rgba, "PNG"),
        "sixteen_bit.png": encode(Image.frombytes("I;16", photo.size, gray16.astype("<u2").tobytes()), "PNG"),
        "palette.gif": encode(photo.convert("P"), "GIF"),
        "exif_rotated.jpg": encode(photo.transpose(Image.Transpose.ROTATE_90), "JPEG", exif=exif.tobytes()),
        "webp.webp": encode(photo, "WEBP"),
    }
