"""The HTTP application every HTTP process runs: routes, auth, errors, and the prediction path.

    POST /predict, /predict/top  (the direct path: plain ASGI, no framework layers)
      body size (413) -> auth (header only) -> k -> admission (fast 503 when no worker is ready or
      no slot is free: before the body is read) -> read the body (limits, 408/413/415/400) -> take
      one slot per image (503 if they do not fit) -> decode into the slots (in a thread unless the
      request is alone here) -> hand off to a worker (serving/dispatch.py) -> answer with labels,
      or 504 at the deadline, or 503 if the worker died
    everything else: the FastAPI app (/health, /ready, /metrics, /model, --docs)

The prediction routes skip FastAPI and Starlette's middleware stack and router (about 0.1 ms of
CPU per request on the development VM; README, "Benchmarks"); they keep the same errors, metrics
and limits.

Errors are JSON {"error": "...", "status": N}; a client's mistake is never a 500. Slash variants
are not redirected (`POST /predict/` is a 404, never a 307 built from the Host header), and the
API docs (/docs, /openapi.json) are off unless --docs.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

import serving
from serving.artifact import ArtifactMetadata
from serving.auth import ApiKeyAuth
from serving.config import ServerConfig
from serving.dispatch import DeadlineExceeded, Dispatcher, InferenceFailed, Refused, WorkerDied
from serving.handoff import F_DRAINING, F_STARTED, SharedState
from serving.ingress import (ClientGone, IngressLimitMiddleware, Limits, declared_too_large, decode_opened,
                             error_response, limited_receive, open_all, read_uploads, too_large_response)
from serving.metrics import MetricsMiddleware, RequestMetrics, metrics, render
from serving.openapi import Prediction, TopK, build_document

log = logging.getLogger(__name__)

# A request that is alone in its HTTP process and whose images decode to at most this many pixels
# (about 3 ms for a typical photo JPEG after DCT scaling) is decoded in the event loop, which saves
# the thread hop on a lone client's latency; otherwise decoding runs in a thread, so that the loop
# keeps answering /health, rejections and other requests meanwhile (README, "Where the CPU goes").
INLINE_DECODE_PIXELS = int(os.environ.get("ONNXSHIP_INLINE_DECODE_PIXELS", 600_000))
RETRY_AFTER_S = 1  # what a 503 tells the client to wait before retrying
CLIENT_GONE = 499  # nginx's "client closed request": counted in the metrics, never sent
# what the document calls an integer: int() also takes " 5", "5_0" and "٥", and fails on 5,000 digits
INTEGER = re.compile(r"-?[0-9]{1,18}")
PREDICT_MODES = {"/predict": "class", "/predict/top": "top"}
INTERNAL_ERROR = "internal server error (logged on the server)"


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


def unavailable(refused: Refused) -> JSONResponse:
    metrics().shed.labels(reason=refused.reason).inc()
    return error_response(503, refused.message, {"Retry-After": str(RETRY_AFTER_S)})


class ServingApp:
    """What uvicorn runs: the prediction routes go to `predict` (an ASGI callable), every other
    request and the lifespan to the FastAPI app `api`."""

    def __init__(self, api: FastAPI, predict):
        self.api, self.predict, self.state = api, predict, api.state

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] in PREDICT_MODES:
            await self.predict(scope, receive, send)
        else:
            await self.api(scope, receive, send)


def build_app(config: ServerConfig, info: ModelInfo, state: SharedState, worker_names: list[str],
              server_index: int = 0) -> ServingApp:
    """The app of HTTP process `server_index` (its dispatcher starts with the app's lifespan)."""
    holder: dict = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        dispatcher = Dispatcher(state, app.state.server_index, config.max_queue_wait)
        dispatcher.on_shutdown = app.state.on_shutdown
        dispatcher.start()
        holder["dispatcher"] = dispatcher
        holder["decoder"] = ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode")
        try:
            yield
        finally:
            dispatcher.stop()
            holder["decoder"].shutdown(wait=False)

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
    labels, size, policy, num_classes = metadata.labels, metadata.input_size, metadata.resize_policy, metadata.num_classes
    document = build_document(config, num_classes) if docs else None

    async def infer(request: Request, mode: str, k: int) -> Response:
        start = time.perf_counter()
        deadline = time.monotonic() + config.request_timeout
        dispatcher: Dispatcher = holder["dispatcher"]
        refused = dispatcher.refusal()
        if refused is not None:  # before the body is read
            return unavailable(refused)
        try:
            uploads = await read_uploads(request, limits.max_images)
        except ClientGone:
            metrics().disconnects.labels(stage="upload").inc()
            log.debug("client disconnected during the upload")
            return Response(status_code=CLIENT_GONE)
        try:
            slots = dispatcher.acquire(len(uploads))
        except Refused as refused_now:  # before any decoding
            return unavailable(refused_now)
        try:
            opened, pixels = open_all(uploads, size, policy, limits)
            if pixels <= INLINE_DECODE_PIXELS and dispatcher.held == len(slots):  # alone here: nobody waits
                decode_opened(opened, dispatcher.views(slots), size, policy)
            else:
                await asyncio.get_running_loop().run_in_executor(holder["decoder"], decode_opened, opened,
                                                                 dispatcher.views(slots), size, policy)
        except BaseException:
            dispatcher.release(slots, handed_off=False)
            raise
        try:
            answer = await dispatcher.run(slots, mode, k, deadline, request.receive)
        except Refused as refused_now:
            return unavailable(refused_now)
        except DeadlineExceeded:
            return error_response(504, f"no answer within the request deadline ({config.request_timeout:g} s, "
                                  "--request-timeout): the server is overloaded; retry later")
        except WorkerDied as died:
            return error_response(503, str(died), {"Retry-After": str(RETRY_AFTER_S)})
        except ConnectionAbortedError:
            metrics().disconnects.labels(stage="waiting").inc()
            return Response(status_code=CLIENT_GONE)
        except InferenceFailed as failed:
            log.error("inference failed: %s", failed)
            return error_response(500, "inference failed (logged on the server)")
        results = format_results(answer, mode, labels)
        elapsed = round(time.perf_counter() - start, 6)
        if len(results) == 1:
            return JSONResponse({**results[0], "processing_time": elapsed})
        return JSONResponse({"results": results, "count": len(results), "processing_time": elapsed})

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

    def top_k_of(request: Request) -> int:
        raw = request.query_params.get("k", "5")
        if not INTEGER.fullmatch(raw):
            raise HTTPException(422, f"k: expected an integer in 1..{num_classes}, got {raw[:40]!r}")
        k = int(raw)
        if not 1 <= k <= num_classes:
            raise HTTPException(422, f"k={k} is out of range: expected 1..{num_classes} (the model's classes)")
        return k

    async def answer(request: Request) -> Response:
        if request.method != "POST":
            raise HTTPException(405, "Method Not Allowed", {"Allow": "POST"})
        auth.check(request)  # before k is looked at: no information without the key
        mode = PREDICT_MODES[request.scope["path"]]
        return await infer(request, mode, top_k_of(request) if mode == "top" else 1)

    async def predict(scope, receive, send) -> None:
        """POST /predict: the best class of each image (one image, several `file` parts or JSON
        `images`); POST /predict/top?k=: the k best (1..classes, default 5)."""
        start = time.perf_counter()
        max_bytes = limits.max_payload_bytes
        if declared_too_large(scope, max_bytes):
            response = too_large_response(max_bytes)
        else:
            try:
                response = await answer(Request(scope, limited_receive(receive, max_bytes)))
            except StarletteHTTPException as error:
                response = error_response(error.status_code, error.detail, error.headers)
            except Exception:
                log.exception("unhandled error on %s", scope["path"])
                response = error_response(500, INTERNAL_ERROR)
        try:
            await response(scope, receive, send)
        finally:
            requests.observe(scope["path"], response.status_code, time.perf_counter() - start)

    return ServingApp(app, predict)


def format_results(answer, mode: str, labels) -> list[Prediction] | list[TopK]:
    """One answer per image, without `processing_time` (serving/openapi.py: the types of the document)."""
    ids, confidences = answer.ids, answer.confidences
    if mode == "top":
        return [{"predictions": [{"class_id": int(c), "confidence": float(p), "label": labels[int(c)]}
                                 for c, p in zip(row_ids, row_conf)]}
                for row_ids, row_conf in zip(ids, confidences)]
    return [{"class_id": int(row_ids[0]), "confidence": float(row_conf[0]), "label": labels[int(row_ids[0])]}
            for row_ids, row_conf in zip(ids, confidences)]
