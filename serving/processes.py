"""Process handling shared by the server, the release's local target, the team stack, the benchmarks
and the tests (Linux /proc where it helps).

    pid_alive(pid)                   is the process there and not a zombie?
    group_alive(pgid)                does any live (non-zombie) process remain in the group?
    stop_process_group(pid, timeout) stop a process group we started (a server and its children):
                                     SIGINT (or `sig`) to the group, SIGKILL to whatever is left
                                     after `timeout` seconds; reaps `pid` when it is our child.
    process_cmdline(pid), process_cwd(pid)   who a PID is now (guards against PID reuse)
    port_in_use(host, port), log_tail(path)  what a starting service needs to check and show
    process_age(pid)                 seconds since the process started (Linux /proc, 10 ms ticks)

A server started with `start_new_session=True` leads its own process group, so one call stops it
and every process it forked or spawned, and nothing else on the machine.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

POLL_S = 0.05


def _state(pid: int) -> str | None:
    """The one-letter state of `pid` from /proc (None: gone or not Linux)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def process_age(pid: int | None = None) -> float | None:
    """Seconds since `pid` (default: this process) started, from /proc (None where there is none)."""
    try:
        started_ticks = int(Path(f"/proc/{pid or os.getpid()}/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - started_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, IndexError, ValueError):
        return None


def pid_alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie (a zombie has exited; only its status is left)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    return _state(pid) not in ("Z", "X")


def group_members(pgid: int) -> list[int] | None:
    """Live members of process group `pgid` from /proc, or None where /proc cannot tell."""
    proc = Path("/proc")
    if not (proc / "self" / "stat").exists():
        return None
    members = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            members.append(int(entry.name))
    return members


def group_alive(pgid: int) -> bool:
    members = group_members(pgid)
    if members is not None:
        return bool(members)
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reap(pid: int) -> int | None:
    """Collect the exit status of our child `pid` if it has exited (None: still running or not ours)."""
    try:
        waited, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return None
    return os.waitstatus_to_exitcode(status) if waited == pid else None


def wait_group(pgid: int, timeout: float, reap_pid: bool = True) -> bool:
    """Wait up to `timeout` seconds for every process of the group to end; True if they did."""
    deadline = time.monotonic() + timeout
    while True:
        if reap_pid:
            reap(pgid)
        if not group_alive(pgid):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL_S)


def stop_process_group(pid: int, timeout: float = 20.0, sig: int = signal.SIGINT, reap_pid: bool = True) -> bool:
    """Stop the process group led by `pid`: `sig` to the whole group, then SIGKILL after `timeout`
    seconds. True when every process ended before SIGKILL was needed.

    With `reap_pid` (the default) the leader's exit status is collected here when it is our child,
    so it leaves no zombie; a caller that wants the status from its `subprocess.Popen` passes
    `reap_pid=False` and calls `.wait()` itself."""
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        if reap_pid:
            reap(pid)
        return True
    if wait_group(pid, timeout, reap_pid):
        return True
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    wait_group(pid, 10.0, reap_pid)
    return False


def process_cmdline(pid: int) -> list[str]:
    """The command line of `pid` ([] when it is gone or unreadable)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").rstrip("\0").split("\0")
    except OSError:
        return []


def process_cwd(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return None


def port_in_use(host: str, port: int) -> bool:
    """True when nothing may bind `host:port` now (another process listens there)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def log_tail(path: Path, lines: int = 20, indent: str = "") -> str:
    """The last `lines` lines of a log file, for an error message."""
    try:
        content = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return indent + "(no log)"
    return "\n".join(indent + line for line in content[-lines:])
