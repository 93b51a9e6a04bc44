"""Load generation for the benchmarks: request bodies, a cheap keep-alive HTTP client, closed-loop
levels, and starting/stopping the servers under test.

The client sends pre-encoded requests over one keep-alive socket per simulated client and reads
Content-Length-framed answers: about 0.2 ms of CPU per request (a quarter of `http.client`), so
the load generator takes as little as possible from the server it measures on the same cores.
"""

from __future__ import annotations

import http.client
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from benchmarks.procstat import CpuSample, RoleCache
from serving.processes import stop_process_group

REPO_ROOT = Path(__file__).resolve().parents[1]
# the developers' ImageNet sample beside the checkout (measurement only, never shipped); optional
IMAGENET_SAMPLE = REPO_ROOT.parent / "shared" / "data" / "imagenet-sample-dev"
for _candidate in (IMAGENET_SAMPLE, Path("/work/shared/data/imagenet-sample-dev")):
    if _candidate.is_dir():
        IMAGENET_SAMPLE = _candidate
        break


@dataclass
class Level:
    system: str
    concurrency: int
    images: int = 0
    errors: int = 0
    seconds: float = 0.0
    cpu: CpuSample | None = None  # CPU of the server's processes by role, and of the load generator
    latencies_ms: list[float] = field(default_factory=list, repr=False)

    @property
    def throughput(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0

    def cpu_ms_per_image(self, *roles: str) -> float | None:
        if self.cpu is None or not self.images:
            return None
        seconds = sum(self.cpu.by_role.get(r, 0.0) for r in roles) if roles else self.cpu.server_seconds
        return seconds / self.images * 1000

    @property
    def loadgen_ms_per_image(self) -> float | None:
        return self.cpu.self_seconds / self.images * 1000 if self.cpu is not None and self.images else None

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else float("nan")

    def row(self) -> dict:
        def r(value):
            return None if value is None else round(value, 2)

        return {"system": self.system, "concurrency": self.concurrency, "img_s": round(self.throughput, 1),
                "p50_ms": r(self.percentile(50)), "p95_ms": r(self.percentile(95)), "p99_ms": r(self.percentile(99)),
                "requests": self.images, "errors": self.errors,
                "cpu_ms_per_img": r(self.cpu_ms_per_image()), "http_ms": r(self.cpu_ms_per_image("http")),
                "worker_ms": r(self.cpu_ms_per_image("worker")),
                "other_ms": r(self.cpu_ms_per_image("main", "other")), "loadgen_ms": r(self.loadgen_ms_per_image)}


def jpeg_bodies(extra_dirs: list[Path], limit: int) -> list[bytes]:
    """Real JPEG files: data/images/*.jpg and the optional ImageNet sample (never shipped)."""
    paths = [p for p in sorted((REPO_ROOT / "data" / "images").iterdir()) if p.suffix.lower() in (".jpg", ".jpeg")]
    for directory in [IMAGENET_SAMPLE, *extra_dirs]:
        if directory.is_dir():
            paths += [p for p in sorted(directory.iterdir()) if p.suffix.lower() in (".jpg", ".jpeg")]
    return [p.read_bytes() for p in paths[:limit]]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def multipart(*images: bytes) -> tuple[bytes, str]:
    boundary = "onnxshipbench" + uuid.uuid4().hex
    parts = [(f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"image{i}.jpg\"\r\n"
              "Content-Type: image/jpeg\r\n\r\n").encode() + data + b"\r\n" for i, data in enumerate(images)]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def encoded_request(port: int, path: str, headers: dict, body: bytes, content_type: str) -> bytes:
    lines = [f"POST {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", f"Content-Type: {content_type}",
             f"Content-Length: {len(body)}", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class KeepAliveClient:
    """One HTTP/1.1 keep-alive connection that sends pre-encoded requests."""

    def __init__(self, port: int, timeout: float = 60):
        self.port, self.timeout = port, timeout
        self.sock: socket.socket | None = None
        self.buffer = b""

    def request(self, raw: bytes) -> int:
        """Send one complete request; the answer's status code (the body is read and dropped)."""
        if self.sock is None:
            self.sock = socket.create_connection(("127.0.0.1", self.port), timeout=self.timeout)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.buffer = b""
        self.sock.sendall(raw)
        while b"\r\n\r\n" not in self.buffer:
            self._receive()
        head, _, rest = self.buffer.partition(b"\r\n\r\n")
        length, close = 0, False
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"connection" and value.strip().lower() == b"close":
                close = True
        self.buffer = rest
        while len(self.buffer) < length:
            self._receive()
        self.buffer = self.buffer[length:]
        if close:
            self.close()
        return int(head[9:12])

    def _receive(self) -> None:
        chunk = self.sock.recv(1 << 16)
        if not chunk:
            raise ConnectionError("server closed the connection")
        self.buffer += chunk

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def run_level(system: str, concurrency: int, duration: float, warmup: float, call,
              pid: int | None = None) -> Level:
    """`concurrency` closed-loop clients call `call(client, i)` for warmup + duration seconds."""
    level = Level(system, concurrency)
    samples: list[CpuSample] = []
    roles = RoleCache(pid)
    lock = threading.Lock()
    start_at = time.perf_counter() + warmup
    stop_at = start_at + duration

    def client(w: int) -> None:
        i = w
        local, errors = [], 0
        while True:
            t0 = time.perf_counter()
            if t0 >= stop_at:
                break
            ok = call(w, i)
            t1 = time.perf_counter()
            i += concurrency
            if t0 >= start_at and t1 <= stop_at:
                if ok:
                    local.append((t1 - t0) * 1000)
                else:
                    errors += 1
        with lock:
            level.latencies_ms += local
            level.errors += errors

    def sample_cpu() -> None:
        roles.sample()  # learn the roles before the measurement starts
        time.sleep(max(0.0, start_at - time.perf_counter()))
        samples.append(roles.sample())
        time.sleep(max(0.0, stop_at - time.perf_counter()))
        samples.append(roles.sample())

    sampler = threading.Thread(target=sample_cpu, daemon=True)
    sampler.start()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(client, range(concurrency)))
    sampler.join()
    if len(samples) == 2:
        level.cpu = samples[1].minus(samples[0])
    level.images = len(level.latencies_ms)
    level.seconds = duration
    return level


def bench_http(system: str, port: int, path: str, headers: dict, bodies: list[bytes], concurrency: int,
               duration: float, warmup: float, pid: int | None = None, images_per_request: int = 1) -> Level:
    n = images_per_request
    groups = [[bodies[(i + j) % len(bodies)] for j in range(n)] for i in range(0, len(bodies), n)]
    requests = [encoded_request(port, path, headers, *multipart(*group)) for group in groups]
    clients = [KeepAliveClient(port) for _ in range(concurrency)]

    def call(w: int, i: int) -> bool:
        try:
            return clients[w].request(requests[i % len(requests)]) == 200
        except (OSError, ValueError):
            clients[w].close()
            return False

    try:
        level = run_level(system, concurrency, duration, warmup, call, pid)
    finally:
        for client in clients:
            client.close()
    if n > 1:  # throughput and CPU per image: each successful request carried n images
        level.images *= n
        level.system += f" ({n} img/req)"
    return level


def start_server(command: list[str], env: dict, port: int, ready_path: str, cwd: Path = REPO_ROOT,
                 timeout: float = 180) -> subprocess.Popen:
    """Start a server in its own process group and wait until `ready_path` answers 200."""
    log = tempfile.NamedTemporaryFile(prefix="onnxship-bench-", suffix=".log", delete=False)
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL, start_new_session=True)
    process.log_path = Path(log.name)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{' '.join(command[1:4])} exited with {process.returncode}: "
                             f"{process.log_path.read_text()[-3000:]}")
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            connection.request("GET", ready_path)
            if connection.getresponse().status == 200:
                return process
        except OSError:
            pass
        time.sleep(0.3)
    stop_server(process)
    raise SystemExit(f"{' '.join(command)} not ready after {timeout} s")


def stop_server(process: subprocess.Popen, keep_log: bool = False) -> None:
    stop_process_group(process.pid, timeout=45)
    log_path = getattr(process, "log_path", None)
    if log_path is not None and not keep_log:
        log_path.unlink(missing_ok=True)


def server_command(model: Path, port: int, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "serving", "--model", str(model), "--host", "127.0.0.1", "--port", str(port),
            "--log-level", "warning", *extra]


def bench_env(api_key: str) -> dict:
    return {**{k: v for k, v in os.environ.items() if not k.startswith("ONNXSHIP_")},
            "PYTHONUNBUFFERED": "1", "API_KEY": api_key}


def machine_busy(seconds: float = 1.0) -> float:
    """Share of all CPUs busy over `seconds` (Linux /proc/stat; 0 elsewhere)."""
    def sample():
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(fields), fields[3] + (fields[4] if len(fields) > 4 else 0)

    try:
        total1, idle1 = sample()
        time.sleep(seconds)
        total2, idle2 = sample()
    except (OSError, ValueError, IndexError):
        return 0.0
    return 1.0 - (idle2 - idle1) / max(1, total2 - total1)


def wait_for_quiet(max_wait: float, threshold: float = 0.15) -> None:
    """On a shared machine, start a measurement when other programs leave the CPUs alone."""
    deadline = time.monotonic() + max_wait
    while time.monotonic() < deadline and machine_busy() > threshold:
        pass
