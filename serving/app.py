"""The HTTP application every HTTP process runs: routes, auth, errors, and the prediction routes.

    POST /predict, /predict/top  serving/prediction.py: driven straight by the HTTP protocol
      (serving/httpserver.py), or through ASGI by `ServingApp` for requests that arrive that way
    everything else: the FastAPI app (/health, /ready, /metrics, /model, --docs)

Errors are JSON {"error": "...", "status": N}; a client's mistake is never a 500. Slash variants
are not redirected (`POST /predict/` is a 404, never a 307 built from the Host header), and the
API docs (/docs, /openapi.json) are off unless --docs.
"""

from __future__ import annotations

import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

import serving
from serving.artifact import ArtifactMetadata
from serving.auth import ApiKeyAuth
from serving.config import ServerConfig
from serving.dispatch import Dispatcher
from serving.handoff import F_DRAINING, F_STARTED, SharedState
from serving.ingress import IngressLimitMiddleware, Limits, error_response
from serving.metrics import MetricsMiddleware, RequestMetrics, render
from serving.openapi import build_document
from serving.prediction import INTERNAL_ERROR, PREDICT_MODES, PredictionRoute

log = logging.getLogger(__name__)


class ModelInfo:
    """What the HTTP processes know about the model (read once in the main process)."""

    def __init__(self, config: ServerConfig, path: Path, metadata: ArtifactMetadata, sha256: str, device: str,
                 state_dir: Path, started: float | None = None):
        self.config, self.path, self.metadata, self.sha256 = config, path, metadata, sha256
        self.device, self.state_dir = device, state_dir
        self.started = time.monotonic() if started is None else started  # the main process's start

    def workers(self) -> list[dict]:
        notes = []
        for path in sorted(self.state_dir.glob("worker-*.json")):
            try:
                notes.append(json.loads(path.read_text()))
            except (OSError, ValueError):
                continue
        return notes

    def startup(self) -> dict:
        """Time to ready: from the main process's start to the moment the last worker finished
        loading and warming up (kept in startup.json once the supervisor saw every worker ready, so
        that a respawned worker does not change it)."""
        try:
            return json.loads((self.state_dir / "startup.json").read_text())
        except (OSError, ValueError):
            pass
        notes = self.workers()
        if len(notes) < (self.config.workers or 1) or not all("ready_monotonic" in n for n in notes):
            return {"ready_after_s": None}
        last = max(notes, key=lambda n: n["ready_monotonic"])
        slowest = max(notes, key=lambda n: n["session_build_s"] + n["warmup_s"])
        return {"ready_after_s": round(last["ready_monotonic"] - self.started, 3),
                "session_build_s": slowest["session_build_s"], "warmup_s": slowest["warmup_s"]}

    def describe(self) -> dict:
        md, cfg = self.metadata, self.config
        workers = self.workers()
        providers = sorted({p for w in workers for p in w.get("providers", [])})
        return {
            "name": cfg.model_name, "version": cfg.model_version, "run_id": cfg.model_run_id, "source": cfg.model,
            "file": self.path.name, "sha256": self.sha256, "arch": md.arch, "input_size": md.input_size,
            "layout": md.layout, "resize_policy": md.resize_policy, "num_classes": md.num_classes,
            "weights_sha256": md.weights_sha256, "exported_at": md.exported_at, "opset": md.opset,
            "onnxship_version": md.onnxship_version, "precision": md.precision, "device": self.device,
            "providers": providers, "workers": workers, "startup": self.startup(),
            **({"gpu": {"tensorrt": cfg.tensorrt, "trt_fp16": cfg.trt_fp16, "trt_cache_dir": cfg.trt_cache_dir,
                        "cudnn_conv_algo_search": cfg.cudnn_conv_algo_search}} if self.device == "cuda" else {}),
            "batching": {"workers": cfg.workers, "max_batch_size": cfg.max_batch_size,
                         "batch_timeout": cfg.batch_timeout, "max_images_per_request": cfg.max_images_per_request},
            "limits": {"max_queued_images": cfg.max_queued_images, "request_timeout": cfg.request_timeout,
                       "max_payload_bytes": cfg.max_payload_bytes, "max_image_pixels": cfg.max_image_pixels,
                       "max_request_pixels": cfg.max_request_pixels},
            "server_version": serving.__version__,
        }


def validation_message(error: RequestValidationError) -> str:
    parts = []
    for item in error.errors():
        where = ".".join(str(p) for p in item.get("loc", ()) if p not in ("query", "body"))
        parts.append(f"{where}: {item.get('msg')} (got {item.get('input')!r})")
    return "; ".join(parts) or "invalid request"


def install_error_handlers(app: FastAPI) -> None:
    async def http_error(request: Request, exc: StarletteHTTPException):
        return error_response(exc.status_code, exc.detail, getattr(exc, "headers", None))

    async def invalid(request: Request, exc: RequestValidationError):
        return error_response(422, validation_message(exc))

    async def unexpected(request: Request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return error_response(500, INTERNAL_ERROR)

    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(Exception, unexpected)


class ServingApp:
    """What uvicorn runs: the prediction routes (`prediction`, which the HTTP protocol also calls
    directly) and the FastAPI app `api` for every other request and the lifespan."""

    def __init__(self, api: FastAPI, prediction: PredictionRoute):
        self.api, self.prediction, self.state = api, prediction, api.state

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] in PREDICT_MODES:
            await self.prediction.asgi(scope, receive, send)
        else:
            await self.api(scope, receive, send)


def build_app(config: ServerConfig, info: ModelInfo, state: SharedState, worker_names: list[str],
              server_index: int = 0) -> ServingApp:
    """The app of HTTP process `server_index` (its dispatcher starts with the app's lifespan)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        dispatcher = Dispatcher(state, app.state.server_index, config.max_queue_wait)
        dispatcher.on_shutdown = app.state.on_shutdown
        dispatcher.start()
        decoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode")
        prediction.start(dispatcher, decoder)
        try:
            yield
        finally:
            dispatcher.stop()
            decoder.shutdown(wait=False)

    docs = config.docs
    app = FastAPI(title="onnxship", version=serving.__version__, lifespan=lifespan, redirect_slashes=False,
                  docs_url="/docs" if docs else None, redoc_url=None, openapi_url="/openapi.json" if docs else None,
                  telemetry={"tracing": False, "metrics": False, "logs": False})
    app.openapi = lambda: document  # the document of serving/openapi.py, not one inferred from the routes
    app.state.server_index = server_index
    app.state.on_shutdown = None
    requests = RequestMetrics()
    app.add_middleware(IngressLimitMiddleware, max_bytes=int(config.max_payload_bytes))
    app.add_middleware(MetricsMiddleware, requests=requests)
    install_error_handlers(app)
    auth = ApiKeyAuth(None if config.no_auth else config.api_key)
    limits = Limits(int(config.max_payload_bytes), config.max_images_per_request, config.max_image_pixels,
                    config.max_request_pixels)
    metadata = info.metadata
    prediction = PredictionRoute(config.request_timeout, limits, auth, metadata.labels, metadata.num_classes,
                                 metadata.input_size, metadata.resize_policy, requests)
    document = build_document(config, metadata.num_classes) if docs else None

    @app.get("/health")
    async def health():
        """Liveness: the HTTP server answers. No auth (platform probes)."""
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        """Readiness: 200 while at least one worker can serve (once all have loaded the model), 503
        while starting, when no worker is ready, and from the first moment of a drain."""
        states = state.worker_states()
        workers = dict(zip(worker_names, states))
        ready_count = states.count("ready")
        if state.flags[F_DRAINING]:
            status = "draining"
        elif ready_count == len(states):
            status = "ready"
        elif not state.flags[F_STARTED]:
            status = "starting"
        else:
            status = "degraded" if ready_count else "unavailable"
        ok = status in ("ready", "degraded")
        return JSONResponse({"ready": ok, "status": status, "workers": workers}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus_metrics():
        body, content_type = render()
        return Response(body, media_type=content_type)

    @app.get("/model", dependencies=[Depends(auth)])
    async def model():
        return info.describe()

    return ServingApp(app, prediction)
