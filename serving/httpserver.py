"""One HTTP process: uvicorn (uvloop + httptools) serving serving/app.py on the shared socket.

What differs from a plain `uvicorn.run`:
- The supervisor decides when this process stops. SIGINT/SIGTERM are ignored here (a signal to the
  whole process group, as Ctrl-C or a platform's scale-down sends, must not cut accepted requests
  short); the supervisor's "shut down" message on the answer socket starts uvicorn's graceful
  shutdown: stop accepting, close idle keep-alive connections, finish every accepted request.
- Request headers must be complete within --header-timeout seconds of the connection (or of a
  keep-alive request's first byte), and the body within --body-timeout seconds of the headers
  (else 408): uvicorn has neither limit, so a slow client could hold a connection forever. This
  relies on uvicorn's HttpToolsProtocol parser callbacks and RequestResponseCycle flags (uvicorn
  0.54; tests/serving/test_litserve_contract.py checks them).
- POST /predict and /predict/top go from the protocol's parser callbacks straight to
  serving/prediction.py (`PredictionCycle`): no ASGI scope, messages or task per request, the
  body collected here, the answer written in one piece. Other requests, and a prediction request
  pipelined behind one still in progress, take uvicorn's ASGI path.
- The process dies with the supervisor (PR_SET_PDEATHSIG where Linux offers it).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import signal
import sys

import httptools
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from serving.prediction import PREDICT_MODES

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1


def name_process(name: str) -> None:
    """Show `name` in ps/top (/proc/self/comm, 15 characters): benchmarks attribute CPU by it."""
    try:
        with open("/proc/self/comm", "w") as comm:
            comm.write(name[:15])
    except OSError:
        pass


def die_with_parent() -> None:
    """SIGKILL this process when the supervisor dies, whatever killed it."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def ignore_stop_signals() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class _NobodyWaits:
    """uvicorn's connection_lost sets the current cycle's message_event: nobody waits on ours."""

    @staticmethod
    def set() -> None:
        pass


class PredictionCycle:
    """A prediction request on its way through the protocol: the attributes uvicorn's protocol
    reads on `self.cycle` (response flags, keep_alive, message_event) and the body so far."""

    __slots__ = ("call", "chunks", "keep_alive", "awaiting_continue", "response_started", "response_complete",
                 "disconnected", "message_event")

    def __init__(self, keep_alive: bool, awaiting_continue: bool):
        self.call = None
        self.awaiting_continue = awaiting_continue  # Expect: 100-continue, not answered yet
        self.chunks: list[bytes] = []
        self.keep_alive = keep_alive
        self.response_started = self.response_complete = self.disconnected = False
        self.message_event = _NobodyWaits


class TimeoutProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with deadlines for complete request headers and body, and the
    prediction routes served without ASGI."""

    header_timeout = 10.0
    body_timeout = 30.0
    prediction = None  # serving.prediction.PredictionRoute of this process
    _timer = None

    def _arm(self, seconds: float, callback) -> None:
        self._disarm()
        self._timer = self.loop.call_later(seconds, callback)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm(self.header_timeout, self._too_slow)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._timer is None:
            self._arm(self.header_timeout, self._too_slow)

    def on_headers_complete(self) -> None:
        if not self._begin_prediction():
            super().on_headers_complete()
        self._arm(self.body_timeout, self._body_too_slow)

    def on_body(self, body: bytes) -> None:
        cycle = self.cycle
        if type(cycle) is not PredictionCycle:
            super().on_body(body)
        elif not cycle.response_complete and self.prediction.body_arrived(cycle.call, len(body)):
            cycle.chunks.append(body)

    def on_message_complete(self) -> None:
        self._disarm()
        cycle = self.cycle
        if type(cycle) is not PredictionCycle:
            super().on_message_complete()
        elif not cycle.response_complete:
            body, cycle.chunks = b"".join(cycle.chunks), []
            self.prediction.receive_body(cycle.call, body)

    def connection_lost(self, exc) -> None:
        self._disarm()
        cycle = self.cycle
        if type(cycle) is PredictionCycle:
            cycle.disconnected = not cycle.response_complete
            self.prediction.client_gone(cycle.call)  # (nothing to do when it was answered)
        super().connection_lost(exc)

    def _begin_prediction(self) -> bool:
        """Take a POST to a prediction route, unless it is pipelined behind a request in progress
        (then uvicorn queues it for the ASGI path, which keeps the answers in order)."""
        if self.prediction is None or self.parser.get_method() != b"POST":
            return False
        if self.cycle is not None and not self.cycle.response_complete:
            return False
        url = httptools.parse_url(self.url)
        path = url.path.decode("latin-1")
        if path not in PREDICT_MODES:
            return False
        cycle = self.cycle = PredictionCycle(self.parser.should_keep_alive(), self.expect_100_continue)
        cycle.call = self.prediction.begin("POST", path, url.query or b"", self.headers,
                                           lambda reply: self._reply(cycle, reply))
        if cycle.awaiting_continue and not cycle.call.finished:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            cycle.awaiting_continue = False
        return True

    def _reply(self, cycle: PredictionCycle, reply) -> None:
        """Write a prediction route's answer, then what uvicorn does after a response."""
        cycle.response_started = cycle.response_complete = True
        if cycle.disconnected or self.transport.is_closing():
            return
        # refused before "100 Continue": the client may never send the body the parser would wait for
        keep_alive = cycle.keep_alive and not reply.closes and not cycle.awaiting_continue
        self.transport.write(reply.http(self.server_state.default_headers, keep_alive))
        if not keep_alive:
            self.transport.close()
        self.on_response_complete()

    def _too_slow(self) -> None:
        self._timer = None
        if not self.transport.is_closing():
            self.transport.close()

    def _body_too_slow(self) -> None:
        """408 (when no answer has started yet) and close: the app sees a disconnect."""
        self._timer = None
        if self.transport.is_closing():
            return
        cycle = self.cycle
        if cycle is not None and not cycle.response_started:
            message = (f'{{"error": "the request body did not arrive within {self.body_timeout:g} s '
                       f'(--body-timeout)", "status": 408}}').encode()
            self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                                 b"connection: close\r\ncontent-length: " + str(len(message)).encode() +
                                 b"\r\n\r\n" + message)
            cycle.response_started = cycle.response_complete = True
        self.transport.close()


def protocol_with(header_timeout: float, body_timeout: float, prediction=None) -> type[TimeoutProtocol]:
    return type("TimeoutProtocol", (TimeoutProtocol,), {"header_timeout": header_timeout,
                                                        "body_timeout": body_timeout, "prediction": prediction})


class SupervisedServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):  # the supervisor's message stops this server, not signals
        yield


def http_main(index: int, config, info, state, worker_names: list[str], sock) -> None:
    """Entry point of HTTP process `index` (forked by the supervisor)."""
    ignore_stop_signals()
    die_with_parent()
    name_process(f"onnxship-http{index}")
    from serving.app import build_app

    app = build_app(config, info, state, worker_names, index)
    uvicorn_config = uvicorn.Config(
        app, http=protocol_with(config.header_timeout, config.body_timeout, app.prediction), loop="uvloop", lifespan="on", log_level=config.log_level,
        access_log=False, timeout_keep_alive=5, timeout_graceful_shutdown=max(1, int(config.drain_timeout)),
    )
    server = SupervisedServer(uvicorn_config)
    app.state.on_shutdown = lambda: setattr(server, "should_exit", True)
    server.run(sockets=[sock])
