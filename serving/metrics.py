"""Prometheus metrics that stay correct across LitServe's processes.

The server runs several processes (HTTP servers that decode images, inference workers that run
ONNX Runtime). prometheus_client's multiprocess mode gives each process its own memory-mapped
files in PROMETHEUS_MULTIPROC_DIR; GET /metrics merges them. That directory must be set before
prometheus_client is first imported, so `prepare_multiprocess_dir` runs first thing in
`python -m serving`, and the metric objects are created lazily (`metrics()`).

Metrics:
  onnxship_requests_total{endpoint,status}        counter    every HTTP request
  onnxship_request_duration_seconds{endpoint}     histogram  wall time per request
  onnxship_images_decoded_total{outcome}          counter    ok | rejected (client error)
  onnxship_decode_duration_seconds                histogram  decode + resize per image
  onnxship_batch_size                             histogram  images per ONNX Runtime call
  onnxship_inference_duration_seconds             histogram  one ONNX Runtime call
  onnxship_queue_wait_seconds                     histogram  hand-off to a worker -> picked up
  onnxship_handoff_seconds                        histogram  per request: round trip to the worker
                                                             minus queue wait minus inference
  onnxship_queued_images                          gauge      images admitted, not yet answered
  onnxship_admission_limit_images                 gauge      the admission bound now (adapts to the
                                                             allowed queueing time)
  onnxship_shed_total{reason}                     counter    503 before any work: queue_full |
                                                             no_worker | draining
  onnxship_dropped_total{reason}                  counter    admitted, never computed: deadline |
                                                             disconnected | worker_died
  onnxship_client_disconnects_total{stage}        counter    client gone: upload | waiting
  onnxship_process_restarts_total{kind}           counter    worker | http (by the supervisor)
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
FINE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128)
TRACKED_ENDPOINTS = ("/predict", "/predict/top", "/model", "/health", "/ready", "/metrics")


def prepare_multiprocess_dir(path: str | Path | None = None) -> Path:
    """Point prometheus_client at a clean per-server directory (call before importing it)."""
    chosen = path or os.environ.get(MULTIPROC_ENV)
    if chosen:
        directory = Path(chosen)
        directory.mkdir(parents=True, exist_ok=True)
        for stale in directory.glob("*.db"):  # values of a previous run would be merged in
            stale.unlink()
    else:
        directory = Path(tempfile.mkdtemp(prefix="onnxship-metrics-"))
    os.environ[MULTIPROC_ENV] = str(directory)
    return directory


def remove_multiprocess_dir(directory: Path) -> None:
    if directory.name.startswith("onnxship-metrics-"):
        shutil.rmtree(directory, ignore_errors=True)


class Metrics:
    def __init__(self):
        from prometheus_client import Counter, Gauge, Histogram

        self.requests = Counter("onnxship_requests", "HTTP requests by endpoint and status", ["endpoint", "status"])
        self.request_duration = Histogram(
            "onnxship_request_duration_seconds", "HTTP request wall time", ["endpoint"], buckets=LATENCY_BUCKETS
        )
        self.images_decoded = Counter("onnxship_images_decoded", "Images decoded, by outcome", ["outcome"])
        self.decode_duration = Histogram(
            "onnxship_decode_duration_seconds", "Decode + resize time per image", buckets=LATENCY_BUCKETS
        )
        self.batch_size = Histogram("onnxship_batch_size", "Images per ONNX Runtime call", buckets=BATCH_BUCKETS)
        self.inference_duration = Histogram(
            "onnxship_inference_duration_seconds", "Time of one ONNX Runtime call", buckets=LATENCY_BUCKETS
        )
        self.queue_wait = Histogram("onnxship_queue_wait_seconds", "From hand-off to a worker until it picks the "
                                    "request up", buckets=FINE_BUCKETS)
        self.handoff = Histogram("onnxship_handoff_seconds", "Per request: round trip to the worker minus queue "
                                 "wait minus inference", buckets=FINE_BUCKETS)
        self.queued = Gauge("onnxship_queued_images", "Images admitted and not yet answered", multiprocess_mode="livesum")
        self.admission_limit = Gauge("onnxship_admission_limit_images", "Images the server admits at most now "
                                     "(adapted to --max-queue-wait)", multiprocess_mode="livesum")
        self.shed = Counter("onnxship_shed", "Requests refused with 503 before any work", ["reason"])
        self.dropped = Counter("onnxship_dropped", "Admitted requests never computed", ["reason"])
        self.disconnects = Counter("onnxship_client_disconnects", "Clients gone before their answer", ["stage"])
        self.restarts = Counter("onnxship_process_restarts", "Processes respawned by the supervisor", ["kind"])


_metrics: Metrics | None = None
_metrics_lock = threading.Lock()


def metrics() -> Metrics:
    """This process's metric objects, created on first use. The first requests of an HTTP process
    reach this from the event loop and from decoding threads at once: creating them twice would
    register every series twice and fail those requests, so creation holds a lock."""
    global _metrics
    if _metrics is None:
        with _metrics_lock:
            if _metrics is None:
                _metrics = Metrics()
    return _metrics


def endpoint_label(path: str) -> str:
    """Bounded label values: unknown paths (scanners, typos) share one label."""
    return path if path in TRACKED_ENDPOINTS else "other"


def render() -> tuple[bytes, str]:
    """The exposition text merged over all processes (or this process outside the server)."""
    from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest, multiprocess

    if os.environ.get(MULTIPROC_ENV):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


class RequestMetrics:
    """requests_total and request_duration of one HTTP process, by endpoint and status."""

    def __init__(self):
        self.children: dict = {}  # (endpoint, status) -> (counter, histogram): labels() costs ~10 us

    def observe(self, path: str, status: int, seconds: float) -> None:
        key = (endpoint_label(path), status)
        children = self.children.get(key)
        if children is None:
            m = metrics()
            children = self.children[key] = (m.requests.labels(endpoint=key[0], status=str(status)),
                                             m.request_duration.labels(endpoint=key[0]))
        children[0].inc()
        children[1].observe(seconds)


class MetricsMiddleware:
    """Pure ASGI middleware: counts and times every HTTP request by endpoint and status."""

    def __init__(self, app, requests: RequestMetrics):
        self.app, self.requests = app, requests

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.requests.observe(scope.get("path", ""), status, time.perf_counter() - start)


def mark_process_dead(pid: int) -> None:
    """Forget a dead process's live gauges (its counters and histograms keep counting)."""
    if os.environ.get(MULTIPROC_ENV):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)
