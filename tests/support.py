"""Small helpers the test areas share (importable as `support`: pyproject sets pythonpath = tests)."""

from __future__ import annotations

import socket

from serving.processes import stop_process_group  # noqa: F401  (the one implementation, for the tests)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (tests never use the default 8192)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
