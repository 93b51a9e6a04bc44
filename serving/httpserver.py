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
- The process dies with the supervisor (PR_SET_PDEATHSIG where Linux offers it).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import signal
import sys

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

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


class TimeoutProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with deadlines for complete request headers and body."""

    header_timeout = 10.0
    body_timeout = 30.0
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
        super().on_headers_complete()
        self._arm(self.body_timeout, self._body_too_slow)

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

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


def protocol_with(header_timeout: float, body_timeout: float) -> type[TimeoutProtocol]:
    return type("TimeoutProtocol", (TimeoutProtocol,), {"header_timeout": header_timeout,
                                                        "body_timeout": body_timeout})


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
        app, http=protocol_with(config.header_timeout, config.body_timeout), loop="uvloop", lifespan="on", log_level=config.log_level,
        access_log=False, timeout_keep_alive=5, timeout_graceful_shutdown=max(1, int(config.drain_timeout)),
    )
    server = SupervisedServer(uvicorn_config)
    app.state.on_shutdown = lambda: setattr(server, "should_exit", True)
    server.run(sockets=[sock])
