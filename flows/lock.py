"""One release at a time per model: an exclusive lock held for the whole release flow.

Two releases of the same model would race on the registry's aliases and on the local server's port.
The lock is a file in the state directory (`.onnxship/locks/release-<model>.lock`) held with
`fcntl.flock`, so it works the same under `make release`, a Prefect worker or a test, and the kernel
releases it when the process holding it dies (no stale lock to clean up by hand). The file says who
holds it, so the refusal can name the holder.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path


class ReleaseBusy(RuntimeError):
    """Another release of the same model holds the lock; the message names it."""


def lock_path(state_dir: Path, model_name: str) -> Path:
    return Path(state_dir) / "locks" / f"release-{model_name}.lock"


@contextmanager
def release_lock(state_dir: Path, model_name: str, wait_s: float = 0.0, flow_run: str | None = None):
    """Hold the model's release lock; raise ReleaseBusy if another release holds it for more than `wait_s`."""
    path = lock_path(state_dir, model_name)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise ReleaseBusy(busy_message(path, model_name)) from None
                time.sleep(0.5)
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "flow_run": flow_run,
                                 "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}))
        handle.flush()
        try:
            yield path
        finally:
            handle.seek(0)
            handle.truncate()
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_free(state_dir: Path, model_name: str) -> None:
    """Fail fast, before a release spends time starting Prefect, when another one holds the lock (the
    flow itself still takes the lock: this check only saves the wait)."""
    with release_lock(state_dir, model_name):
        pass


def busy_message(path: Path, model_name: str) -> str:
    try:
        holder = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        holder = {}
    who = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} since {holder.get('since', '?')}"
    if holder.get("flow_run"):
        who += f", Prefect flow run {holder['flow_run']}"
    return (f"another release of {model_name} is running ({who}): one release at a time per model, since two "
            f"would race on the registry's aliases and the local server; wait for it to finish "
            f"(or stop that process) and run again. Lock: {path}")
