"""The prediction routes, POST /predict and /predict/top: one request's way from its headers to its
answer, as a chain of event-loop callbacks (no ASGI messages, task, future or thread hop per request).

    headers   413 (declared size) -> 405 -> API key (401) -> k (422) -> admission (503: no worker
              ready, queue full): all answered before a byte of the body is read
    body      the upload forms (415/400, serving/ingress.py) -> one slot per image (503 if they do
              not fit) -> image headers and pixel budgets (400)
    decode    into the slots: in the event loop, one image per loop turn, so that between two
              decodes the loop reads other connections, answers /health and sends rejections; in
              the decode thread for a request with an image over INLINE_DECODE_PIXELS (a long
              decode must not stall the loop)
    hand-off  a descriptor to a worker (serving/dispatch.py); the answer, the deadline (504), the
              worker's death (503) or the client leaving (499, never sent) settles the request
    answer    JSON with labels and processing_time

Two drivers feed it. The HTTP protocol of the HTTP processes (serving/httpserver.py) calls `begin`
when a request's headers are complete and `receive_body` with the whole body, and writes the
Reply itself. `PredictionRoute.asgi` does the same over ASGI for requests that reach the app that
way (a pipelined request, Starlette's TestClient). On the development VM the protocol path costs
about 0.2 ms less CPU per image than the ASGI one (README, "Host overhead, fifth pass").
"""

from __future__ import annotations

import asyncio
import http
import json
import logging
import os
import re
import time
from collections import deque
from urllib.parse import parse_qsl

from fastapi import HTTPException

from serving.auth import ApiKeyAuth
from serving.dispatch import DeadlineExceeded, Dispatcher, InferenceFailed, Refused, WorkerDied
from serving.ingress import (Limits, PayloadTooLarge, declared_too_large, decode_one, decode_opened, open_all,
                             read_uploads)
from serving.metrics import RequestMetrics, metrics

log = logging.getLogger(__name__)

PREDICT_MODES = {"/predict": "class", "/predict/top": "top"}
# A request with an image that decodes to more than this many pixels (JPEGs after DCT scaling; a
# typical photo is 50 to 200 thousand, about 2 ms) is decoded in a thread, so the event loop keeps
# serving other connections meanwhile; smaller images in the loop, one per loop turn.
INLINE_DECODE_PIXELS = int(os.environ.get("ONNXSHIP_INLINE_DECODE_PIXELS", 600_000))
RETRY_AFTER_S = 1  # what a 503 tells the client to wait before retrying
CLIENT_GONE = 499  # nginx's "client closed request": counted in the metrics, never sent
# what the document calls an integer: int() also takes " 5", "5_0" and "٥", and fails on 5,000 digits
INTEGER = re.compile(r"-?[0-9]{1,18}")
INTERNAL_ERROR = "internal server error (logged on the server)"
STATUS_LINES = {code: f"HTTP/1.1 {code} {http.HTTPStatus(code).phrase}\r\n".encode()
                for code in (200, 400, 401, 405, 408, 413, 415, 422, 500, 503, 504)}


class Reply:
    """A JSON answer: rendered like Starlette's JSONResponse (compact, UTF-8)."""

    __slots__ = ("status", "body", "headers")

    def __init__(self, status: int, document, headers: dict | None = None):
        self.status = status
        self.body = json.dumps(document, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()
        self.headers = headers or {}

    @classmethod
    def error(cls, status: int, message, headers: dict | None = None) -> Reply:
        return cls(status, {"error": message, "status": status}, headers)

    @property
    def closes(self) -> bool:
        return self.headers.get("Connection") == "close"

    def header_list(self) -> list[tuple[bytes, bytes]]:
        return [(b"content-type", b"application/json"), (b"content-length", str(len(self.body)).encode()),
                *((name.lower().encode(), value.encode("latin-1")) for name, value in self.headers.items())]

    def http(self, default_headers: list[tuple[bytes, bytes]], keep_alive: bool) -> bytes:
        """The whole HTTP/1.1 response (one write)."""
        status = STATUS_LINES.get(self.status) or f"HTTP/1.1 {self.status} \r\n".encode()
        lines = [status, *(name + b": " + value + b"\r\n" for name, value in default_headers + self.header_list())]
        if not keep_alive and not self.closes:
            lines.append(b"connection: close\r\n")
        lines.append(b"\r\n")
        lines.append(self.body)
        return b"".join(lines)


def unavailable(refused: Refused) -> Reply:
    metrics().shed.labels(reason=refused.reason).inc()
    return Reply.error(503, refused.message, {"Retry-After": str(RETRY_AFTER_S)})


class Call:
    """One prediction request. `respond(reply)` is the driver's: called once, or never when the
    client is gone."""

    __slots__ = ("path", "mode", "k", "content_type", "respond", "started", "deadline", "slots", "pending",
                 "finished", "received")

    def __init__(self, path: str, respond):
        self.path, self.respond = path, respond
        self.mode, self.k, self.content_type = PREDICT_MODES.get(path, "class"), 1, ""
        self.started = time.perf_counter()
        self.deadline = 0.0
        self.slots: list[int] = []
        self.pending = None
        self.finished = False
        self.received = 0  # body bytes so far


def header_dict(headers) -> dict[str, str]:
    """Raw (name, value) byte pairs as a dict of lower-case names (the first of repeated ones)."""
    result: dict[str, str] = {}
    for name, value in headers:
        result.setdefault(name.decode("latin-1").lower(), value.decode("latin-1"))
    return result


class PredictionRoute:
    """The prediction routes of one HTTP process; `start` (in the app's lifespan) gives it the
    dispatcher, the decode thread and the event loop."""

    def __init__(self, request_timeout: float, limits: Limits, auth: ApiKeyAuth, labels, num_classes: int,
                 input_size: int, resize_policy: str, requests: RequestMetrics):
        self.request_timeout, self.limits, self.auth = request_timeout, limits, auth
        self.labels, self.num_classes = labels, num_classes
        self.size, self.policy = input_size, resize_policy
        self.requests = requests
        self.dispatcher: Dispatcher | None = None
        self.decoder = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.decode_queue: deque = deque()
        self.turn_scheduled = False

    def start(self, dispatcher: Dispatcher, decoder) -> None:
        self.dispatcher, self.decoder = dispatcher, decoder
        self.loop = asyncio.get_running_loop()

    @property
    def max_body(self) -> int:
        return self.limits.max_payload_bytes

    # ------------------------------------------------------------ the steps

    def begin(self, method: str, path: str, query: bytes, headers, respond) -> Call:
        """A request's headers are complete. Returns its Call; `call.finished` when it has been
        answered already (a rejection: the body that follows is not read)."""
        call = Call(path, respond)
        if declared_too_large(headers, self.max_body):
            return self.finish(call, self.too_large())
        fields = header_dict(headers)
        try:
            if method != "POST":
                raise HTTPException(405, "Method Not Allowed", {"Allow": "POST"})
            self.auth.check(fields)  # before k is looked at: no information without the key
            if call.mode == "top":
                call.k = self.top_k_of(query)
        except Exception as error:  # noqa: BLE001 - a 4xx naming the problem, or a logged 500
            return self.finish(call, self.error_reply(error))
        call.content_type = fields.get("content-type", "")
        call.deadline = time.monotonic() + self.request_timeout
        refused = self.dispatcher.refusal()
        if refused is not None:
            return self.finish(call, unavailable(refused))
        return call

    def body_arrived(self, call: Call, size: int) -> bool:
        """Count `size` more body bytes; False (and 413 answered) once over --max-payload-bytes."""
        call.received += size
        if call.received <= self.max_body:
            return True
        self.finish(call, self.too_large())
        return False

    def too_large(self) -> Reply:
        return Reply.error(413, PayloadTooLarge(self.max_body).detail, {"Connection": "close"})

    def receive_body(self, call: Call, body: bytes) -> None:
        """The whole body is here: read the uploads, take slots, then decode (this turn or later)."""
        if call.finished:
            return
        try:
            uploads = read_uploads(call.content_type, body, self.limits.max_images)
            call.slots = self.dispatcher.acquire(len(uploads))
            opened, _ = open_all(uploads, self.size, self.policy, self.limits)
        except Refused as refused:  # before any decoding
            self.finish(call, unavailable(refused))
            return
        except Exception as error:  # noqa: BLE001 - a 4xx naming the problem, or a logged 500
            self.release_undecoded(call)
            self.finish(call, self.error_reply(error))
            return
        if max(image.width * image.height for _, _, image in opened) > INLINE_DECODE_PIXELS:
            decoding = self.loop.run_in_executor(self.decoder, decode_opened, opened,
                                                 self.dispatcher.views(call.slots), self.size, self.policy)
            decoding.add_done_callback(lambda done: self.decoded(call, done.exception()))
            return
        self.decode_queue.extend((call, opened, index) for index in range(len(opened)))
        if not self.turn_scheduled:
            self.turn_scheduled = True
            self.loop.call_soon(self.decode_turn)

    def decode_turn(self) -> None:
        """Decode one queued image; the next one after the loop has looked at its sockets."""
        call, opened, index = self.decode_queue.popleft()
        if self.decode_queue:
            self.loop.call_soon(self.decode_turn)
        else:
            self.turn_scheduled = False
        if call.finished:  # the client left, or an earlier image of the request failed
            self.release_undecoded(call)
            return
        try:
            [target] = self.dispatcher.views(call.slots[index:index + 1])
            decode_one(opened, index, target, self.size, self.policy)
        except Exception as error:  # noqa: BLE001 - answered, as in the thread
            self.decoded(call, error)
        else:
            if index == len(opened) - 1:
                self.decoded(call, None)

    def decoded(self, call: Call, error: BaseException | None) -> None:
        """Hand the decoded images to a worker, or answer the decoding error."""
        if error is not None or call.finished:
            self.release_undecoded(call)
            if error is not None:
                self.finish(call, self.error_reply(error))
            return
        try:
            call.pending = self.dispatcher.submit(call.slots, call.mode, call.k, call.deadline,
                                                  lambda outcome: self.answered(call, outcome))
        except Refused as refused:
            self.finish(call, unavailable(refused))
        except Exception as error:  # noqa: BLE001 - logged, a 500 for this request only
            self.release_undecoded(call)
            self.finish(call, self.error_reply(error))

    def answered(self, call: Call, outcome) -> None:
        if isinstance(outcome, DeadlineExceeded):
            reply = Reply.error(504, f"no answer within the request deadline ({self.request_timeout:g} s, "
                                "--request-timeout): the server is overloaded; retry later")
        elif isinstance(outcome, WorkerDied):
            reply = Reply.error(503, str(outcome), {"Retry-After": str(RETRY_AFTER_S)})
        elif isinstance(outcome, ConnectionAbortedError):
            return  # abandoned by `client_gone`, which counted it
        elif isinstance(outcome, InferenceFailed):
            log.error("inference failed: %s", outcome)
            reply = Reply.error(500, "inference failed (logged on the server)")
        else:
            try:
                reply = self.answer_reply(call, outcome)
            except Exception:  # noqa: BLE001
                log.exception("formatting the answer of %s failed", call.path)
                reply = Reply.error(500, INTERNAL_ERROR)
        self.finish(call, reply)

    def client_gone(self, call: Call) -> None:
        """The connection closed before the answer: stop what can be stopped, count it."""
        if call.finished:
            return
        call.finished = True
        stage = "waiting" if call.slots else "upload"  # (slots are taken once the whole body is here)
        metrics().disconnects.labels(stage=stage).inc()
        log.debug("client disconnected (%s)", stage)
        if call.pending is not None:
            self.dispatcher.abandon(call.pending)
        # (slots not handed off yet come back when their decode turn, or the thread, ends)
        self.requests.observe(call.path, CLIENT_GONE, time.perf_counter() - call.started)

    # ------------------------------------------------------------ replies

    def finish(self, call: Call, reply: Reply) -> Call:
        if not call.finished:
            call.finished = True
            self.requests.observe(call.path, reply.status, time.perf_counter() - call.started)
            call.respond(reply)
        return call

    def release_undecoded(self, call: Call) -> None:
        if call.slots and call.pending is None:
            self.dispatcher.release(call.slots, handed_off=False)
            call.slots = []

    def answer_reply(self, call: Call, answer) -> Reply:
        results = format_results(answer, call.mode, self.labels)
        elapsed = round(time.perf_counter() - call.started, 6)
        if len(results) == 1:
            return Reply(200, {**results[0], "processing_time": elapsed})
        return Reply(200, {"results": results, "count": len(results), "processing_time": elapsed})

    @staticmethod
    def error_reply(error: BaseException) -> Reply:
        if isinstance(error, HTTPException):
            return Reply.error(error.status_code, error.detail, getattr(error, "headers", None))
        log.error("unhandled error on a prediction route", exc_info=error)
        return Reply.error(500, INTERNAL_ERROR)

    def top_k_of(self, query: bytes) -> int:
        raw = query_value(query, "k", "5")
        if not INTEGER.fullmatch(raw):
            raise HTTPException(422, f"k: expected an integer in 1..{self.num_classes}, got {raw[:40]!r}")
        k = int(raw)
        if not 1 <= k <= self.num_classes:
            raise HTTPException(422, f"k={k} is out of range: expected 1..{self.num_classes} (the model's classes)")
        return k

    # ------------------------------------------------------------ the ASGI driver

    async def asgi(self, scope, receive, send) -> None:
        """The same routes for requests that come through ASGI."""
        replied: asyncio.Future = asyncio.get_running_loop().create_future()
        call = self.begin(scope["method"], scope["path"], scope.get("query_string", b""), scope["headers"],
                          replied.set_result)
        if not call.finished:
            body = await self.read_body(call, receive)
            if body is not None:
                self.receive_body(call, body)
                await self.wait_for(call, replied, receive)
        if replied.done():
            reply = replied.result()
            await send({"type": "http.response.start", "status": reply.status, "headers": reply.header_list()})
            await send({"type": "http.response.body", "body": reply.body})

    async def read_body(self, call: Call, receive) -> bytes | None:
        chunks = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self.client_gone(call)
                return None
            chunk = message.get("body", b"")
            if not self.body_arrived(call, len(chunk)):
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def wait_for(self, call: Call, replied: asyncio.Future, receive) -> None:
        watcher = asyncio.ensure_future(receive())
        try:
            while not replied.done():
                await asyncio.wait({replied, watcher}, return_when=asyncio.FIRST_COMPLETED)
                if watcher.done() and not replied.done():
                    if watcher.result().get("type") == "http.disconnect":
                        self.client_gone(call)
                        return
                    watcher = asyncio.ensure_future(receive())
        except asyncio.CancelledError:  # the server gave up on this request (forced shutdown)
            self.client_gone(call)
            raise
        finally:
            watcher.cancel()


def query_value(query: bytes, name: str, default: str) -> str:
    """The value of `name` in a raw query string (percent- and plus-decoded; the last one when
    repeated, as Starlette's query_params), else `default`."""
    value = default
    for key, found in parse_qsl(query.decode("latin-1"), keep_blank_values=True):
        if key == name:
            value = found
    return value


def format_results(answer, mode: str, labels) -> list[dict]:
    """One answer per image, without `processing_time` (serving/openapi.py: the types of the document)."""
    ids, confidences = answer.ids, answer.confidences
    if mode == "top":
        return [{"predictions": [{"class_id": int(c), "confidence": float(p), "label": labels[int(c)]}
                                 for c, p in zip(row_ids, row_conf)]}
                for row_ids, row_conf in zip(ids, confidences)]
    return [{"class_id": int(row_ids[0]), "confidence": float(row_conf[0]), "label": labels[int(row_ids[0])]}
            for row_ids, row_conf in zip(ids, confidences)]
