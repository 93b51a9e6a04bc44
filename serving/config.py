"""Server configuration: one dataclass, filled from the command line with environment fallbacks.

Every flag of `python -m serving` has an environment variable (the platform-friendly way to
configure a container). Precedence: command line > environment > default. `None` for workers,
batching and threads means "pick for the device" (see `ServerConfig.resolved`).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import asdict, dataclass, field, replace

from serving.providers import CUDNN_CONV_ALGO_SEARCH, DEFAULT_CUDNN_CONV_ALGO_SEARCH, GpuSettings, default_trt_cache_dir
from serving.cpus import cpu_count
from serving.runtime import DEVICES, SPINNING

DEFAULT_PORT = 8192  # the seed's port
DEFAULT_MAX_PAYLOAD_BYTES = 20 * 1024 * 1024
DEFAULT_MAX_IMAGES_PER_REQUEST = 32
# Per image and per request, in pixels really decoded (JPEGs after DCT scaling): a 6000x4000
# camera PNG still classifies, while one request cannot buy more than ~0.7 s of decoding CPU.
DEFAULT_MAX_IMAGE_PIXELS = 24_000_000
DEFAULT_MAX_REQUEST_PIXELS = 64_000_000
# Admission bound: images queued or in flight = workers x max batch x QUEUE_BATCHES, i.e. the
# queueing time allowed in front of each worker, counted in batches (README, "Failure model").
QUEUE_BATCHES = 8

# Tuned on a 2-core CPU (README.md, "Serving", "CPU tuning"): one worker per core, each ORT
# session with twice its share of the cores (a lone request gets two cores; under full load the
# 2x oversubscription measured no loss), small greedy batches (batching barely helps a CPU).
CPU_DEFAULTS = {"max_batch_size": 4, "batch_timeout": 0.0}
GPU_DEFAULTS = {"workers": 1, "max_batch_size": 32, "batch_timeout": 0.005}
# Inference workers' niceness on CPU: +5 (HTTP processes first) measured no better rejection latency
# than the machine's noise on the 2-core machine, and less goodput (README, "Failure model").
CPU_WORKER_NICE = 0
ORT_SPINNING = ("auto", *SPINNING)  # auto: alone on CPU, on with CUDA
WORKER_SCHED = ("auto", "normal", "batch")  # auto: normal on CPU, batch with CUDA
# how long an inference worker that just served keeps polling for the next request (yielding the
# core to anything runnable) before it sleeps: a sleeping worker takes 0.1-0.3 ms to wake
WORKER_SPIN_US = 5000

ENV = {  # field -> environment variable
    "model": "ONNXSHIP_MODEL",
    "host": "ONNXSHIP_HOST",
    "port": "ONNXSHIP_PORT",
    "workers": "ONNXSHIP_WORKERS",
    "max_batch_size": "ONNXSHIP_MAX_BATCH_SIZE",
    "batch_timeout": "ONNXSHIP_BATCH_TIMEOUT",
    "device": "ONNXSHIP_DEVICE",
    "intra_op_threads": "ONNXSHIP_INTRA_OP_THREADS",
    "api_servers": "ONNXSHIP_API_SERVERS",
    "tensorrt": "ONNXSHIP_TENSORRT",
    "trt_fp16": "ONNXSHIP_TRT_FP16",
    "trt_cache_dir": "ONNXSHIP_TRT_CACHE_DIR",
    "cudnn_conv_algo_search": "ONNXSHIP_CUDNN_CONV_ALGO_SEARCH",
    "no_auth": "ONNXSHIP_NO_AUTH",
    "api_key": "API_KEY",  # the seed's variable
    "expected_sha256": "ONNXSHIP_EXPECTED_SHA256",
    "max_payload_bytes": "ONNXSHIP_MAX_PAYLOAD_BYTES",
    "max_images_per_request": "ONNXSHIP_MAX_IMAGES_PER_REQUEST",
    "model_name": "ONNXSHIP_MODEL_NAME",
    "model_version": "ONNXSHIP_MODEL_VERSION",
    "model_run_id": "ONNXSHIP_MODEL_RUN_ID",
    "log_level": "ONNXSHIP_LOG_LEVEL",
    "request_timeout": "ONNXSHIP_REQUEST_TIMEOUT",
    "max_queued_images": "ONNXSHIP_MAX_QUEUED_IMAGES",
    "drain_timeout": "ONNXSHIP_DRAIN_TIMEOUT",
    "drain_grace": "ONNXSHIP_DRAIN_GRACE",
    "header_timeout": "ONNXSHIP_HEADER_TIMEOUT",
    "body_timeout": "ONNXSHIP_BODY_TIMEOUT",
    "max_image_pixels": "ONNXSHIP_MAX_IMAGE_PIXELS",
    "max_request_pixels": "ONNXSHIP_MAX_REQUEST_PIXELS",
    "docs": "ONNXSHIP_DOCS",
    "max_queue_wait": "ONNXSHIP_MAX_QUEUE_WAIT",
    "worker_nice": "ONNXSHIP_WORKER_NICE",
    "worker_spin_us": "ONNXSHIP_WORKER_SPIN_US",
    "ort_spinning": "ONNXSHIP_ORT_SPINNING",
    "worker_sched": "ONNXSHIP_WORKER_SCHED",
}
ENV_ALIASES = {"expected_sha256": ("MODEL_SHA256",), "trt_cache_dir": ("ONNXSHIP_TRT_CACHE",)}


class ConfigError(ValueError):
    """A setting is missing or invalid; the message names the flag and the environment variable."""


def cpu_threads_per_worker(cores: int, workers: int) -> int:
    """ORT intra-op threads per worker: twice the worker's share of the cores, at most all of them."""
    return min(cores, 2 * max(1, cores // workers))


@dataclass(frozen=True)
class ServerConfig:
    model: str = ""
    host: str = "0.0.0.0"
    port: int = DEFAULT_PORT
    workers: int | None = None
    max_batch_size: int | None = None
    batch_timeout: float | None = None
    device: str = "auto"
    intra_op_threads: int | None = None
    api_servers: int | None = None
    tensorrt: bool = False
    trt_fp16: bool = False
    trt_cache_dir: str = field(default_factory=default_trt_cache_dir)
    cudnn_conv_algo_search: str = DEFAULT_CUDNN_CONV_ALGO_SEARCH
    api_key: str | None = field(default=None, repr=False)  # never printed
    no_auth: bool = False
    expected_sha256: str | None = None
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES
    max_images_per_request: int = DEFAULT_MAX_IMAGES_PER_REQUEST
    model_name: str | None = None
    model_version: str | None = None
    model_run_id: str | None = None
    log_level: str = "info"
    request_timeout: float = 30.0
    max_queued_images: int | None = None
    drain_timeout: float = 20.0
    drain_grace: float = 1.0
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    max_request_pixels: int = DEFAULT_MAX_REQUEST_PIXELS
    docs: bool = False
    max_queue_wait: float = 1.0
    worker_nice: int | None = None
    worker_spin_us: int | None = None
    ort_spinning: str = "auto"
    worker_sched: str = "auto"

    def validate(self) -> ServerConfig:
        if not self.model:
            raise ConfigError("no model: pass --model PATH|models:/name@alias or set ONNXSHIP_MODEL")
        if self.ort_spinning not in ORT_SPINNING:
            raise ConfigError(f"--ort-spinning {self.ort_spinning!r}: expected one of {', '.join(ORT_SPINNING)}")
        if self.worker_sched not in WORKER_SCHED:
            raise ConfigError(f"--worker-sched {self.worker_sched!r}: expected one of {', '.join(WORKER_SCHED)} "
                              f"({ENV['worker_sched']})")
        if self.trt_fp16 and not self.tensorrt:
            raise ConfigError("--trt-fp16 (ONNXSHIP_TRT_FP16) builds FP16 TensorRT engines: it needs --tensorrt "
                              "(ONNXSHIP_TENSORRT)")
        if self.cudnn_conv_algo_search not in CUDNN_CONV_ALGO_SEARCH:
            raise ConfigError(f"--cudnn-conv-algo-search {self.cudnn_conv_algo_search!r}: expected one of "
                              f"{', '.join(CUDNN_CONV_ALGO_SEARCH)} (ONNXSHIP_CUDNN_CONV_ALGO_SEARCH)")
        if self.tensorrt and not self.trt_cache_dir:
            raise ConfigError("--trt-cache-dir (ONNXSHIP_TRT_CACHE_DIR) is empty: name a folder for TensorRT engines")
        if self.device not in DEVICES:
            raise ConfigError(f"--device {self.device!r}: expected one of {', '.join(DEVICES)}")
        if not 1 <= self.port <= 65535:
            raise ConfigError(f"--port {self.port}: expected 1..65535")
        for name in ("workers", "max_batch_size", "intra_op_threads", "api_servers", "max_queued_images"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} {value}: must be >= 1 ({ENV[name]})")
        if self.batch_timeout is not None and self.batch_timeout < 0:
            raise ConfigError(f"--batch-timeout {self.batch_timeout}: must be >= 0 seconds")
        if self.worker_spin_us is not None and not 0 <= self.worker_spin_us <= 1_000_000:
            raise ConfigError(f"--worker-spin-us {self.worker_spin_us}: must be 0..1000000 microseconds "
                              f"({ENV['worker_spin_us']})")
        for name in ("request_timeout", "drain_timeout", "header_timeout", "body_timeout", "max_queue_wait"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be > 0 seconds ({ENV[name]})")
        if self.drain_grace < 0 or self.drain_grace >= self.drain_timeout:
            raise ConfigError(f"--drain-grace {self.drain_grace}: must be >= 0 and below --drain-timeout "
                              f"{self.drain_timeout}")
        if self.max_image_pixels < 1 or self.max_request_pixels < self.max_image_pixels:
            raise ConfigError("--max-request-pixels must be >= --max-image-pixels >= 1")
        if self.max_payload_bytes < 1024:
            raise ConfigError(f"--max-payload-bytes {self.max_payload_bytes}: must be at least 1024")
        if not self.no_auth and not self.api_key:
            raise ConfigError(
                "refusing to start without authentication: set API_KEY (clients send it as "
                "'X-API-Key: <key>' or 'Authorization: Bearer <key>'), or pass --no-auth explicitly "
                "to serve without a key (local experiments only)"
            )
        if self.expected_sha256 is not None and len(self.expected_sha256) != 64:
            raise ConfigError(f"--expected-sha256: expected 64 hex digits, got {self.expected_sha256!r}")
        return self

    def resolved(self, device: str) -> ServerConfig:
        """Fill the `None` performance settings for the resolved device ("cpu" or "cuda")."""
        defaults = GPU_DEFAULTS if device == "cuda" else {**CPU_DEFAULTS, "workers": cpu_count()}
        workers = self.workers or defaults["workers"]
        threads = self.intra_op_threads
        if threads is None and device == "cpu":
            threads = cpu_threads_per_worker(cpu_count(), workers)
        max_batch_size = self.max_batch_size or defaults["max_batch_size"]
        worker_nice = self.worker_nice if self.worker_nice is not None else (0 if device == "cuda" else CPU_WORKER_NICE)
        worker_spin_us = WORKER_SPIN_US if self.worker_spin_us is None else self.worker_spin_us
        ort_spinning = ("on" if device == "cuda" else "alone") if self.ort_spinning == "auto" else self.ort_spinning
        worker_sched = ("batch" if device == "cuda" else "normal") if self.worker_sched == "auto" else self.worker_sched
        # the HTTP processes do the CPU work (decoding): one per core on a GPU replica, where one worker
        # per GPU leaves the cores to them; one per worker on CPU, where the workers need the cores too
        api_servers = self.api_servers or (max(workers, cpu_count()) if device == "cuda" else workers)
        return replace(
            self,
            workers=workers,
            max_batch_size=max_batch_size,
            batch_timeout=defaults["batch_timeout"] if self.batch_timeout is None else self.batch_timeout,
            intra_op_threads=threads,
            api_servers=api_servers,
            max_queued_images=admission_bound(workers, max_batch_size, api_servers, self.max_images_per_request,
                                              self.max_queued_images),
            worker_nice=worker_nice,
            worker_spin_us=worker_spin_us,
            ort_spinning=ort_spinning,
            worker_sched=worker_sched,
        )

    def gpu_settings(self) -> GpuSettings:
        """What the inference workers need to choose and configure the GPU providers."""
        return GpuSettings(tensorrt=self.tensorrt, trt_fp16=self.trt_fp16, trt_cache_dir=self.trt_cache_dir,
                           max_batch_size=self.max_batch_size or GPU_DEFAULTS["max_batch_size"],
                           cudnn_conv_algo_search=self.cudnn_conv_algo_search)

    def public(self) -> dict:
        """The settings safe to show (no key)."""
        data = asdict(self)
        data.pop("api_key")
        return data


def admission_bound(workers: int, max_batch_size: int, api_servers: int, max_images_per_request: int,
                    requested: int | None = None) -> int:
    """Images the server accepts queued or in flight: `requested`, else workers x max batch x
    QUEUE_BATCHES; at least one full request per HTTP process (each holds an equal share)."""
    bound = requested or workers * max_batch_size * QUEUE_BATCHES
    return max(bound, api_servers * max_images_per_request)


def _parse_bool(value: str) -> bool:
    return value.strip().lower() in ("1", "true", "yes", "on")


def from_env(environ: dict | None = None) -> dict:
    """Settings found in the environment, converted to the field types."""
    environ = os.environ if environ is None else environ
    types = {"port": int, "workers": int, "max_batch_size": int, "intra_op_threads": int, "api_servers": int,
             "batch_timeout": float, "max_payload_bytes": int, "max_images_per_request": int,
             "no_auth": _parse_bool, "tensorrt": _parse_bool, "trt_fp16": _parse_bool, "docs": _parse_bool, "max_queued_images": int,
             "request_timeout": float, "drain_timeout": float, "drain_grace": float, "header_timeout": float,
             "body_timeout": float, "max_image_pixels": int, "max_request_pixels": int, "max_queue_wait": float,
             "worker_nice": int, "worker_spin_us": int}
    found = {}
    for name, variable in ENV.items():
        for candidate in (variable, *ENV_ALIASES.get(name, ())):
            raw = environ.get(candidate)
            if raw is not None and raw != "":
                try:
                    found[name] = types.get(name, str)(raw)
                except ValueError:
                    raise ConfigError(f"{candidate}={raw!r}: not a valid {name.replace('_', ' ')}") from None
                break
    return found


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m serving",
        description="Serve an onnxship ONNX artifact over HTTP with LitServe (dynamic batching, API-key auth).",
        epilog="Every flag has an environment variable (shown in brackets); API_KEY holds the key.",
    )
    add = parser.add_argument
    add("--model", help="path to model.onnx or a registry URI models:/<name>@<alias> [ONNXSHIP_MODEL]")
    add("--host", help="interface to bind (default 0.0.0.0) [ONNXSHIP_HOST]")
    add("--port", type=int, help=f"port (default {DEFAULT_PORT}) [ONNXSHIP_PORT]")
    add("--workers", type=int, help="inference worker processes, one model copy each "
        "(default: one per CPU core, one per GPU) [ONNXSHIP_WORKERS]")
    add("--max-batch-size", type=int,
        help="most images per inference call (default cpu 4, gpu 32) [ONNXSHIP_MAX_BATCH_SIZE]")
    add("--batch-timeout", type=float, help="seconds a worker may wait to fill a batch after the first "
        "request, while more images are being decoded (nothing on its way: no wait) (default cpu 0, gpu 0.005) "
        "[ONNXSHIP_BATCH_TIMEOUT]")
    add("--device", choices=DEVICES, help="auto (GPU when available), cpu or cuda [ONNXSHIP_DEVICE]")
    add("--intra-op-threads", type=int, help="ONNX Runtime threads per worker (default 2 x cores/workers, at most cores) "
        "[ONNXSHIP_INTRA_OP_THREADS]")
    add("--api-servers", type=int, help="HTTP server processes, which read and decode the images (default: "
        "= workers on CPU, one per core with CUDA) [ONNXSHIP_API_SERVERS]")
    add("--tensorrt", action="store_true", default=None, help="TensorRT before CUDA, one engine for batch 1 to "
        "--max-batch-size, cached in --trt-cache-dir [ONNXSHIP_TENSORRT]")
    add("--trt-fp16", action="store_true", default=None, help="FP16 TensorRT engines (with --tensorrt) "
        "[ONNXSHIP_TRT_FP16]")
    add("--trt-cache-dir", help="TensorRT engine and timing caches; keep it on storage that survives restarts "
        "(default ~/.cache/onnxship/tensorrt; the Cerebrium image: /persistent-storage/onnxship/tensorrt) "
        "[ONNXSHIP_TRT_CACHE_DIR]")
    add("--cudnn-conv-algo-search", choices=CUDNN_CONV_ALGO_SEARCH, help="how CUDA picks cuDNN convolution "
        f"algorithms (default {DEFAULT_CUDNN_CONV_ALGO_SEARCH}: EXHAUSTIVE searches again for every new batch size, "
        "on live requests) [ONNXSHIP_CUDNN_CONV_ALGO_SEARCH]")
    add("--no-auth", action="store_true", default=None, help="serve without API key (loudly) [ONNXSHIP_NO_AUTH]")
    add("--expected-sha256", help="refuse to start unless the model file has this sha256 "
        "[ONNXSHIP_EXPECTED_SHA256 or MODEL_SHA256]")
    add("--max-payload-bytes", type=int, help=f"largest request body (default {DEFAULT_MAX_PAYLOAD_BYTES}) "
        "[ONNXSHIP_MAX_PAYLOAD_BYTES]")
    add("--max-images-per-request", type=int, help=f"most images in one request (default "
        f"{DEFAULT_MAX_IMAGES_PER_REQUEST}) [ONNXSHIP_MAX_IMAGES_PER_REQUEST]")
    add("--model-name", help="registry name shown by GET /model [ONNXSHIP_MODEL_NAME]")
    add("--model-version", help="registry version shown by GET /model [ONNXSHIP_MODEL_VERSION]")
    add("--model-run-id", help="MLflow run id shown by GET /model [ONNXSHIP_MODEL_RUN_ID]")
    add("--log-level", choices=("critical", "error", "warning", "info", "debug"), help="[ONNXSHIP_LOG_LEVEL]")
    add("--request-timeout", type=float, help="seconds a prediction may take from arrival to answer; past it the "
        "client gets 504 and the work is dropped before inference (default 30) [ONNXSHIP_REQUEST_TIMEOUT]")
    add("--max-queued-images", type=int, help=f"admission bound: images queued or in flight before new requests "
        f"get 503 + Retry-After (default workers x max batch x {QUEUE_BATCHES}) [ONNXSHIP_MAX_QUEUED_IMAGES]")
    add("--drain-timeout", type=float, help="on SIGTERM/SIGINT, seconds to finish accepted requests before exiting "
        "(default 20; keep it below the platform's grace period) [ONNXSHIP_DRAIN_TIMEOUT]")
    add("--drain-grace", type=float, help="on SIGTERM/SIGINT, seconds /ready answers 503 while connections are "
        "still accepted (default 1) [ONNXSHIP_DRAIN_GRACE]")
    add("--header-timeout", type=float, help="seconds a connection may take to send complete request headers "
        "(default 10) [ONNXSHIP_HEADER_TIMEOUT]")
    add("--body-timeout", type=float, help="seconds a request body may take to arrive, else 408 (default 30) "
        "[ONNXSHIP_BODY_TIMEOUT]")
    add("--max-image-pixels", type=int, help=f"most pixels decoded per image, JPEGs after DCT scaling (default "
        f"{DEFAULT_MAX_IMAGE_PIXELS:,}) [ONNXSHIP_MAX_IMAGE_PIXELS]")
    add("--max-request-pixels", type=int, help=f"most pixels decoded per request, all images together (default "
        f"{DEFAULT_MAX_REQUEST_PIXELS:,}) [ONNXSHIP_MAX_REQUEST_PIXELS]")
    add("--max-queue-wait", type=float, help="allowed queueing time in front of the workers: the admission bound "
        "shrinks while requests wait longer (default 1) [ONNXSHIP_MAX_QUEUE_WAIT]")
    add("--worker-nice", type=int, help="niceness added to the inference workers, e.g. 5 so that decoding, "
        "rejections and /health go first when the cores are full (default 0) [ONNXSHIP_WORKER_NICE]")
    add("--worker-spin-us", type=int, help="microseconds an inference worker that just served keeps polling "
        "for the next request before it sleeps, yielding its core to anything else runnable: waking a sleeping "
        f"worker costs 0.1-0.3 ms per request (default {WORKER_SPIN_US}; 0: sleep at once) [ONNXSHIP_WORKER_SPIN_US]")
    add("--ort-spinning", choices=ORT_SPINNING, help="how ONNX Runtime threads wait for work within a model "
        "call: off = sleep, run = spin while a call lasts, alone = spin only in a call that has the cores to itself "
        "(a lone request), on = spin, also after a call; auto = alone on CPU, on with CUDA [ONNXSHIP_ORT_SPINNING]")
    add("--worker-sched", choices=WORKER_SCHED, help="Linux scheduling policy of the inference workers: batch = a "
        "worker woken by a request does not preempt a process that is decoding; it runs at the next scheduler tick "
        "and takes more images per batch; auto = normal on CPU (the workers compute), batch with CUDA (they feed "
        "the GPU) [ONNXSHIP_WORKER_SCHED]")
    add("--docs", action="store_true", default=None, help="serve the API docs (/docs, /openapi.json); off by "
        "default [ONNXSHIP_DOCS]")
    add("--print-openapi", action="store_true", help="write the OpenAPI document of a server started with these "
        "flags to stdout and exit (no key needed; --model only sets k's maximum to the model's class count)")
    return parser


def load_config(argv: list[str] | None = None, environ: dict | None = None, check: bool = True) -> ServerConfig:
    """Command line over environment over defaults, validated unless `check` is False."""
    args = vars(build_parser().parse_args(argv))
    args.pop("print_openapi")
    settings = from_env(environ)
    settings.update({name: value for name, value in args.items() if value is not None})
    config = ServerConfig(**settings)
    return config.validate() if check else config
