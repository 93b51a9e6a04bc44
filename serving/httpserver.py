"""One HTTP process: uvicorn (uvloop + httptools) serving serving/app.py on the shared socket.

What differs from a plain `uvicorn.run`:
- The supervisor decides when this process stops. SIGINT/SIGTERM are ignored here (a signal to the
  whole process group, as Ctrl-C or a platform's scale-down sends, must not cut accepted requests
  short); the supervisor's "shut down" message on the answer socket starts uvicorn's graceful
  shutdown: stop accepting, close idle keep-alive connections, finish every accepted request.
- Request headers must be complete within --header-timeout seconds of the connection (or of a
  keep-alive request's first byte); uvicorn has no such limit, so a slow-header client could hold
  a connection forever. This relies on uvicorn's HttpToolsProtocol parser callbacks (uvicorn
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


class HeaderTimeoutProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a deadline for complete request headers."""

    header_timeout = 10.0
    _header_timer = None

    def _arm(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout, self._headers_too_slow)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            self.transport.close()


def protocol_with(header_timeout: float) -> type[HeaderTimeoutProtocol]:
    return type("HeaderTimeoutProtocol", (HeaderTimeoutProtocol,), {"header_timeout": header_timeout})


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
        app, http=protocol_with(config.header_timeout), loop="uvloop", lifespan="on", log_level=config.log_level,
        access_log=False, timeout_keep_alive=5, timeout_graceful_shutdown=max(1, int(config.drain_timeout)),
    )
    server = SupervisedServer(uvicorn_config)
    app.state.on_shutdown = lambda: setattr(server, "should_exit", True)
    server.run(sockets=[sock])
