"""Process wiring: one LitServer, one LitAPI, our HTTP routes in front of LitServe's batch queue.

Request path (see README.md, "Serving", "How batching works"):

  HTTP process (uvicorn, N of them)                      inference worker (one model copy each)
  auth -> size limit -> parse body -> decode + resize    GreedyBatchLoop collects payloads,
  (thread pool) -> InferenceRequest(images, mode, k)  -> ClassifierAPI.predict runs one ORT call
  -> LitServe request queue                              for the batch, answers per request
  <- response buffer <------------------------------------

Why not LitServe's own route: it would hand the raw upload to the worker, where one undecodable
image fails its whole batch (LitServe issue #340), malformed JSON answers 500, and every endpoint
(/predict, /predict/top) would need its own LitAPI -- its own workers, model copies and batch
queue. Here every prediction endpoint shares one LitAPI: the payload says what it wants.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import time
import uuid
from pathlib import Path

import litserve as ls
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from litserve.utils import LitAPIStatus, ResponseBufferItem
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.gzip import GZipMiddleware

import serving
from serving.api import ClassifierAPI, InferenceRequest
from serving.artifact import ArtifactMetadata
from serving.auth import ApiKeyAuth
from serving.config import ServerConfig
from serving.images import ImageError, load_image
from serving.metrics import MetricsMiddleware, metrics, render
from serving.runtime import visible_gpu_count

log = logging.getLogger(__name__)

API_PATH = "/predict"  # the LitAPI's queue; its LitServe route is replaced by ours
LITSERVE_ROUTES_REPLACED = {"/", "/health", "/info", API_PATH}
FILE_FIELD = "file"
QUEUE_TIMEOUT_S = 60  # LitServe answers 504 for a request that waited longer in the batch queue
RESPONSE_TIMEOUT_S = 120  # and we stop waiting for a worker that never answers
SHUTDOWN_POLL_S = 0.5  # the main process re-checks for SIGINT/SIGTERM this often
SUPPORTED = "multipart/form-data with a 'file' field, a raw image/* body, or application/json {\"image\": \"<base64>\"}"


class PayloadTooLarge(HTTPException):
    def __init__(self, limit: int):
        super().__init__(
            status_code=413,
            detail=f"request body larger than {limit:,} bytes (the server's --max-payload-bytes); "
            "downscale or compress the image",
        )


class PayloadLimitMiddleware:
    """Refuse bodies over `max_bytes`: early on Content-Length, else while streaming (chunked)."""

    def __init__(self, app, max_bytes: int):
        if not isinstance(max_bytes, int):  # LitServe's own limit breaks every POST with a string
            raise TypeError(f"max_bytes must be an int number of bytes, got {max_bytes!r}")
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            error = PayloadTooLarge(self.max_bytes)
            await error_response(error.status_code, error.detail)(scope, receive, send)
            return
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise PayloadTooLarge(self.max_bytes)
            return message

        await self.app(scope, limited_receive, send)


def error_response(status: int, message, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "status": status}, status_code=status, headers=headers)


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
        return error_response(500, "internal server error (logged on the server)")

    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(Exception, unexpected)


def bad_request(message: str) -> HTTPException:
    return HTTPException(status_code=400, detail=message)


def decode_base64(value, where: str) -> bytes:
    if not isinstance(value, str):
        raise bad_request(f"{where} must be a base64 string, got {type(value).__name__}")
    if value.startswith("data:") and "," in value:  # data URL: data:image/png;base64,....
        value = value.split(",", 1)[1]
    try:
        data = base64.b64decode("".join(value.split()), validate=True)
    except (binascii.Error, ValueError) as error:
        raise bad_request(f"bad base64 in {where}: {error}") from None
    if not data:
        raise bad_request(f"{where} is empty: no image bytes after base64 decoding")
    return data


async def read_uploads(request: Request, max_images: int) -> list[tuple[str, bytes]]:
    """The images of a request as (name, bytes), or an HTTP error naming what is wrong."""
    content_type = request.headers.get("content-type", "")
    media = content_type.split(";")[0].strip().lower()
    if media == "multipart/form-data":
        uploads = await read_multipart(request, max_images)
    elif media.startswith("image/") or media == "application/octet-stream":
        body = await request.body()
        if not body:
            raise bad_request(f"empty body: the {media} request carries 0 bytes")
        uploads = [("body", body)]
    elif media == "application/json" or media.endswith("+json"):
        uploads = read_json(await request.body())
    elif not media:
        body = await request.body()
        if not body:
            raise bad_request(f"no image in the request: send {SUPPORTED}")
        raise HTTPException(415, f"missing Content-Type: send {SUPPORTED}")
    else:
        raise HTTPException(415, f"unsupported Content-Type {media!r}: send {SUPPORTED}")
    if len(uploads) > max_images:
        raise bad_request(f"{len(uploads)} images in one request; the limit is {max_images} (--max-images-per-request)")
    return uploads


async def read_multipart(request: Request, max_images: int) -> list[tuple[str, bytes]]:
    try:
        form = await request.form(max_files=max_images + 1, max_fields=100)
    except HTTPException as error:
        if isinstance(error, PayloadTooLarge):
            raise
        raise bad_request(f"malformed multipart body: {error.detail}") from None
    try:
        items = form.multi_items()
        files = [(key, value) for key, value in items if key == FILE_FIELD]
        if not files:
            other = sorted({key for key, value in items if hasattr(value, "read")})
            if other:
                raise bad_request(f"wrong field name: the image is in {', '.join(map(repr, other))}; "
                                  f"send it in the multipart field {FILE_FIELD!r}")
            raise bad_request(f"no file: the multipart body has no {FILE_FIELD!r} field")
        uploads = []
        for index, (_, value) in enumerate(files, start=1):
            if not hasattr(value, "read"):
                raise bad_request(f"field {FILE_FIELD!r} #{index} is text, not a file upload")
            name = value.filename or f"file #{index}"
            data = await value.read()
            if not data:
                raise bad_request(f"empty file: {name!r} has 0 bytes")
            uploads.append((name, data))
        return uploads
    finally:
        await form.close()


def read_json(body: bytes) -> list[tuple[str, bytes]]:
    if not body.strip():
        raise bad_request('empty JSON body: send {"image": "<base64>"}')
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError) as error:
        raise bad_request(f"malformed JSON: {error}") from None
    if not isinstance(document, dict):
        raise bad_request(f'JSON body must be an object like {{"image": "<base64>"}}, got {type(document).__name__}')
    if "image" in document:
        return [("image", decode_base64(document["image"], "'image'"))]
    if "images" in document:
        images = document["images"]
        if not isinstance(images, list) or not images:
            raise bad_request("'images' must be a non-empty list of base64 strings")
        return [(f"images[{i}]", decode_base64(v, f"'images'[{i}]")) for i, v in enumerate(images)]
    raise bad_request(f"JSON body has no 'image' field (keys: {', '.join(map(repr, document)) or 'none'})")


class ModelInfo:
    """What the HTTP processes know about the model (read once in the main process)."""

    def __init__(self, config: ServerConfig, path: Path, metadata: ArtifactMetadata, sha256: str, device: str,
                 state_dir: Path):
        self.config = config
        self.path = path
        self.metadata = metadata
        self.sha256 = sha256
        self.device = device
        self.state_dir = state_dir

    def workers(self) -> list[dict]:
        notes = []
        for path in sorted(self.state_dir.glob("worker-*.json")):
            try:
                notes.append(json.loads(path.read_text()))
            except (OSError, ValueError):
                continue
        return notes

    def describe(self) -> dict:
        md, cfg = self.metadata, self.config
        workers = self.workers()
        providers = sorted({p for w in workers for p in w.get("providers", [])})
        return {
            "name": cfg.model_name,
            "version": cfg.model_version,
            "run_id": cfg.model_run_id,
            "source": cfg.model,
            "file": self.path.name,
            "sha256": self.sha256,
            "arch": md.arch,
            "input_size": md.input_size,
            "layout": md.layout,
            "resize_policy": md.resize_policy,
            "num_classes": md.num_classes,
            "weights_sha256": md.weights_sha256,
            "exported_at": md.exported_at,
            "opset": md.opset,
            "onnxship_version": md.onnxship_version,
            "device": self.device,
            "providers": providers,
            "workers": workers,
            "batching": {"workers": cfg.workers, "max_batch_size": cfg.max_batch_size,
                         "batch_timeout": cfg.batch_timeout, "max_images_per_request": cfg.max_images_per_request},
            "server_version": serving.__version__,
        }


def decode_uploads(uploads: list[tuple[str, bytes]], metadata: ArtifactMetadata):
    import numpy as np

    m = metrics()
    arrays = []
    for name, data in uploads:
        start = time.perf_counter()
        try:
            arrays.append(load_image(data, metadata.input_size, metadata.resize_policy))
        except ImageError as error:
            m.images_decoded.labels(outcome="rejected").inc()
            prefix = f"{name}: " if len(uploads) > 1 else ""
            raise bad_request(prefix + str(error)) from None
        m.images_decoded.labels(outcome="ok").inc()
        m.decode_duration.observe(time.perf_counter() - start)
    return np.stack(arrays)


class PollingShutdownEvent:
    """LitServer's main thread blocks on its shutdown event (a multiprocessing-manager proxy) until
    the server stops. A blocked main thread only runs Python's signal handlers when its system
    call is interrupted, and the kernel may deliver SIGINT/SIGTERM to another thread of the
    process (LitServe's worker monitor): the signal was then noticed only on the next manager
    message, possibly never. Waiting in short slices lets the handler run within SHUTDOWN_POLL_S."""

    def __init__(self, event):
        self._event = event

    def wait(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._event.wait(SHUTDOWN_POLL_S):
            if deadline is not None and time.monotonic() >= deadline:
                return False
        return True

    def set(self) -> None:
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    def __reduce__(self):  # LitServe hands the event to its other processes
        return (PollingShutdownEvent, (self._event,))


class OnnxshipLitServer(ls.LitServer):
    def _init_manager(self, num_api_servers: int):
        manager = super()._init_manager(num_api_servers)
        self._shutdown_event = PollingShutdownEvent(self._shutdown_event)
        return manager


def build_server(config: ServerConfig, info: ModelInfo) -> ls.LitServer:
    """A LitServer whose HTTP side is ours; `config` must be `resolved` for `info.device`."""
    api = ClassifierAPI(
        info.path,
        device=info.device,
        intra_op_threads=config.intra_op_threads,
        tensorrt=config.tensorrt,
        max_batch_size=config.max_batch_size,
        batch_timeout=config.batch_timeout,
        state_dir=info.state_dir,
    )
    server = OnnxshipLitServer(
        api,
        accelerator="cuda" if info.device == "cuda" else "cpu",
        devices=visible_gpu_count() if info.device == "cuda" else "auto",  # LitServe would need nvidia-smi
        workers_per_device=config.workers,
        timeout=QUEUE_TIMEOUT_S,
        middlewares=[(PayloadLimitMiddleware, {"max_bytes": int(config.max_payload_bytes)}), MetricsMiddleware],
    )
    app = server.app
    # LitServe adds GZip for every response; ours are a few hundred bytes of JSON
    app.user_middleware = [m for m in app.user_middleware if m.cls is not GZipMiddleware]
    app.router.routes[:] = [r for r in app.router.routes if getattr(r, "path", None) not in LITSERVE_ROUTES_REPLACED]
    install_error_handlers(app)
    auth = ApiKeyAuth(None if config.no_auth else config.api_key)
    add_routes(app, server, info, auth)
    return server


def add_routes(app: FastAPI, server: ls.LitServer, info: ModelInfo, auth: ApiKeyAuth) -> None:
    config, metadata = info.config, info.metadata
    num_classes = metadata.num_classes

    async def infer(request: Request, mode: str, k: int) -> Response:
        start = time.perf_counter()
        uploads = await read_uploads(request, config.max_images_per_request)
        images = await run_in_threadpool(decode_uploads, uploads, metadata)
        payload = InferenceRequest(images=images, mode=mode, k=k)
        results = await submit(server, request, payload)
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
        """Readiness: 200 once the model is loaded in every inference worker, 503 before."""
        statuses = dict(server.workers_setup_status) if getattr(server, "workers_setup_status", None) else {}
        workers = {name: str(getattr(status, "value", status)).lower() for name, status in statuses.items()}
        is_ready = bool(workers) and all(status == "ready" for status in workers.values())
        body = {"ready": is_ready, "workers": workers}
        return JSONResponse(body, status_code=200 if is_ready else 503)

    @app.get("/metrics")
    async def prometheus_metrics():
        body, content_type = render()
        return Response(body, media_type=content_type)

    @app.get("/model", dependencies=[Depends(auth)])
    async def model():
        return info.describe()

    @app.post("/predict", dependencies=[Depends(auth)])
    async def predict(request: Request):
        return await infer(request, "class", 1)

    @app.post("/predict/top", dependencies=[Depends(auth)])
    async def predict_top(request: Request, k: int = Query(5, description=f"1..{num_classes}")):
        if not 1 <= k <= num_classes:
            raise HTTPException(422, f"k={k} is out of range: expected 1..{num_classes} (the model's classes)")
        return await infer(request, "top", k)


async def submit(server: ls.LitServer, request: Request, payload: InferenceRequest) -> list[dict]:
    """Put one payload on LitServe's batch queue and wait for this request's answer."""
    uid = uuid.uuid4().hex
    event = asyncio.Event()
    server.response_buffer[uid] = ResponseBufferItem(event)
    try:
        queue = server._get_request_queue(API_PATH)
        queue.put((request.app.response_queue_id, uid, time.monotonic(), payload))
        try:
            await asyncio.wait_for(event.wait(), timeout=RESPONSE_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise HTTPException(504, f"no answer from the inference workers within {RESPONSE_TIMEOUT_S:g} s") from None
        response, status = server.response_buffer[uid].response
    finally:
        server.response_buffer.pop(uid, None)
    if status != LitAPIStatus.OK:
        if isinstance(response, HTTPException) or getattr(response, "status_code", None) == 504:
            raise HTTPException(504, "the request waited too long in the batch queue (server overloaded)")
        log.error("inference failed for request %s: %r", uid, response)
        raise HTTPException(500, "inference failed (logged on the server)")
    return response
