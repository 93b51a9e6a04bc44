"""Processes of the team stack: identity checks before any signal (the generic helpers are
serving/processes.py), waiting, and the PIDs recorded in TEAM_DIR/state.json."""

from __future__ import annotations

import json
import time
import urllib.request

from serving.processes import pid_alive, process_cmdline, process_cwd
from team.config import Config


def is_running(pid: int | None) -> bool:
    return bool(pid) and pid_alive(pid)


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
        if is_running(pid) and str(config.data_dir) in process_cmdline(pid):
            return pid
        return None
    state = load_state(config) if state is None else state
    pid = (state.get(service) or {}).get("pid")
    if is_running(pid) and process_cwd(pid) == str(config.home) and service in " ".join(process_cmdline(pid)):
        return pid
    return None


