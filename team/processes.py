"""Processes of the team stack: liveness from /proc (zombies count as gone), identity checks before
any signal, waiting, ports, and the PIDs recorded in TEAM_DIR/state.json."""

from __future__ import annotations

import json
import os
import socket
import time
import urllib.request
from pathlib import Path

from team.config import Config


def proc_state(pid: int) -> str | None:
    """The kernel's one-letter state of `pid` (None: no such process)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return text.rsplit(")", 1)[1].split()[0]


def is_running(pid: int | None) -> bool:
    return bool(pid) and proc_state(pid) not in (None, "Z", "X")


def proc_cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def proc_cwd(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return None


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of process group `pgid`."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            members.append(int(entry.name))
    return members


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def wait_until(predicate, timeout: float, interval: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            return response.status == 200
    except OSError:
        return False


def log_tail(path: Path, lines: int = 25) -> str:
    try:
        content = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join("    " + line for line in content[-lines:])


# ---------------------------------------------------------------- state

def load_state(config: Config) -> dict:
    try:
        return json.loads(config.state_file.read_text())
    except (OSError, ValueError):
        return {}


def save_state(config: Config, state: dict) -> None:
    config.home.mkdir(parents=True, exist_ok=True)
    tmp = config.state_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2, sort_keys=True))
    tmp.replace(config.state_file)


def postmaster_pid(config: Config) -> int | None:
    try:
        return int((config.data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return None


def running_pid(config: Config, service: str, state: dict | None = None) -> int | None:
    """The PID of our running `service`, verified (None when it does not run)."""
    if service == "postgres":
        pid = postmaster_pid(config)
        if is_running(pid) and str(config.data_dir) in proc_cmdline(pid):
            return pid
        return None
    state = load_state(config) if state is None else state
    pid = (state.get(service) or {}).get("pid")
    if is_running(pid) and proc_cwd(pid) == str(config.home) and service in " ".join(proc_cmdline(pid)):
        return pid
    return None


