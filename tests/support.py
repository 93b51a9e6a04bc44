"""Small helpers the test areas share (importable as `support`: pyproject sets pythonpath = tests)."""

from __future__ import annotations

import os
import signal
import socket
import time


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (tests never use the default 8192)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_process_group(pid: int, timeout: float = 20.0) -> None:
    """Stop a process group we started (a server and its workers) by its leader's PID:
    SIGINT, then SIGKILL after `timeout` seconds."""
    try:
        os.killpg(pid, signal.SIGINT)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
