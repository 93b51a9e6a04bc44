"""The `local` deploy target: a real `python -m serving` process on 127.0.0.1:8192 (by default).

The server is detached (its own session), so it outlives the release command. Its pid, URL, port,
API key and model are recorded in `.onnxship/local-server.json` (mode 0600); `make stop-server`
(this module's `stop` command) stops it by that PID. A new release replaces the server it recorded;
a port held by anything else is an error.

    python -m flows.deploy.local status
    python -m flows.deploy.local stop
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

from flows.deploy.base import DeployError, Endpoint, ModelVersion
from flows.params import DEFAULT_STATE_DIR, ParameterError, ReleaseParams
from flows.secrets import APP_KEY, secret_with_source
from serving.processes import log_tail, pid_alive, port_in_use, process_cmdline, stop_process_group

STATE_FILE = "local-server.json"
LOG_FILE = "local-server.log"
REPO_ROOT = Path(__file__).resolve().parents[2]


class LocalTarget:
    name = "local"

    def check(self, params: ReleaseParams) -> str | None:
        state = read_state(params.state_dir)
        host, port = params.server.host, params.server.port
        if state and state_is_alive(state) and int(state.get("port", -1)) == port:
            return f"port {port}: our local server (pid {state['pid']}) will be replaced by the new release"
        if port_in_use(host, port):
            raise ParameterError(
                f"port {port} on {host} is already in use by another process: stop it, or pass "
                "server.port (make release PORT=...)"
            )
        return None

    def deploy(self, artifact: Path, params: ReleaseParams, model: ModelVersion) -> Endpoint:
        return deploy_local(artifact, params, model)


# ---------------------------------------------------------------- the state file


def state_path(state_dir: Path) -> Path:
    return Path(state_dir) / STATE_FILE


def read_state(state_dir: Path) -> dict | None:
    try:
        return json.loads(state_path(state_dir).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def write_state(state_dir: Path, state: dict) -> Path:
    path = state_path(state_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    os.chmod(tmp, 0o600)  # it holds the API key
    tmp.replace(path)
    return path


def resolve_api_key(previous: dict | None) -> tuple[str, str]:
    """The app key ($API_KEY or its Prefect Secret), else the key the local server already used,
    else a new random one. Returns (key, source): "env ..." | "state" | "generated"."""
    key, source = secret_with_source(APP_KEY)
    if key:
        return key, source
    if previous and previous.get("api_key"):
        return previous["api_key"], "state"
    return secrets.token_urlsafe(24), "generated"


# ---------------------------------------------------------------- processes


def is_our_server(pid: int) -> bool:
    """Guard against PID reuse: the process must still be `python -m serving`."""
    cmdline = process_cmdline(pid)
    if not cmdline:
        return pid_alive(pid)
    return "serving" in cmdline and "-m" in cmdline


def state_is_alive(state: dict) -> bool:
    pid = int(state.get("pid") or 0)
    return pid > 0 and pid_alive(pid) and is_our_server(pid)


def stop_pid(pid: int, timeout_s: float = 20.0) -> bool:
    """Stop the server (its process group: its workers too) by PID; it drains on SIGINT. True if it was running."""
    if not pid_alive(pid):
        return False
    stop_process_group(pid, timeout_s)
    return True


def server_command(model_path: Path, params: ReleaseParams, model: ModelVersion) -> list[str]:
    from serving.artifact import file_sha256

    s = params.server
    command = [sys.executable, "-m", "serving", "--model", str(model_path), "--host", s.host, "--port", str(s.port),
               "--device", s.device, "--expected-sha256", file_sha256(model_path)]
    for flag, value in (("--workers", s.workers), ("--max-batch-size", s.max_batch_size),
                        ("--batch-timeout", s.batch_timeout), ("--model-name", model.name),
                        ("--model-version", model.version), ("--model-run-id", model.run_id)):
        if value is not None:
            command += [flag, str(value)]
    return command


def start_server(model_path: Path, params: ReleaseParams, model: ModelVersion, api_key: str,
                 log_path: Path) -> subprocess.Popen:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "API_KEY": api_key, "PYTHONUNBUFFERED": "1"}
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            server_command(model_path, params, model), cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )


def wait_ready(process: subprocess.Popen, url: str, api_key: str, timeout_s: float, log_path: Path) -> None:
    from serving.client import ClassifierClient, ClientError

    def exited() -> str | None:
        return None if process.poll() is None else f"the server exited with code {process.returncode}"

    try:
        ClassifierClient(url, api_key=api_key, timeout=5.0).wait_until_ready(timeout_s, abort=exited)
    except ClientError as error:
        if process.poll() is None:
            stop_pid(process.pid)
        raise DeployError(f"local server not ready ({error.error}); log {log_path}:\n{log_tail(log_path)}") from None


# ---------------------------------------------------------------- deploy / stop


def stop_server(state_dir: Path) -> dict | None:
    """Stop the recorded local server (if running); returns its state. The record stays, without
    a pid, so the next release reuses the API key and a scheduled smoke test reports the server down."""
    state = read_state(state_dir)
    if state is None:
        return None
    if state.get("pid") and state_is_alive(state):
        stop_pid(int(state["pid"]))
    if state.get("pid"):
        write_state(state_dir, {**{k: v for k, v in state.items() if k != "pid"},
                                "stopped_at": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    return state


def deploy_local(artifact_path: Path, params: ReleaseParams, model: ModelVersion) -> Endpoint:
    """Start (or replace) the local server on the registered artifact and wait until /ready."""
    state_dir = Path(params.state_dir)
    previous = read_state(state_dir)
    api_key, key_source = resolve_api_key(previous)
    if previous and state_is_alive(previous):
        stop_server(state_dir)
    host, port = params.server.host, params.server.port
    if port_in_use(host, port):
        raise DeployError(f"port {port} on {host} is in use by another process: stop it or choose server.port")
    # keep the deployed file where the server can find it after the release's temp files are gone
    deployed = state_dir / "deployed" / f"{model.name or 'model'}-v{model.version or 'dev'}.onnx"
    deployed.parent.mkdir(parents=True, exist_ok=True)
    if Path(artifact_path).resolve() != deployed.resolve():
        deployed.write_bytes(Path(artifact_path).read_bytes())
    log_path = state_dir / LOG_FILE
    url = f"http://{host}:{port}"
    process = start_server(deployed, params, model, api_key, log_path)
    wait_ready(process, url, api_key, params.server.start_timeout_s, log_path)
    state = {"pid": process.pid, "url": url, "host": host, "port": port, "api_key": api_key,
             "model_name": model.name, "version": model.version, "model_path": str(deployed.resolve()),
             "log": str(log_path.resolve()), "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    write_state(state_dir, state)
    return Endpoint(
        url=url, target="local", api_key=api_key,
        details={"pid": process.pid, "log": str(log_path), "state_file": str(state_path(state_dir)),
                 "api_key_source": key_source, "api_key_command": local_command("key", state_dir),
                 "model_path": str(deployed)},
        stop_hint=local_command("stop", state_dir),
    )


def local_command(command: str, state_dir: Path) -> str:
    """How a person runs `command` of this module for the server recorded in `state_dir`."""
    if Path(state_dir) == DEFAULT_STATE_DIR:
        return {"stop": "make stop-server", "key": "make api-key"}.get(command, f"python -m flows.deploy.local {command}")
    return f".venv/bin/python -m flows.deploy.local {command} --state-dir {state_dir}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.deploy.local", description="The local release server.")
    parser.add_argument("command", choices=("stop", "status", "key"),
                        help="stop it, say whether it runs, or print its API key (for `API_KEY=$(make -s api-key)`)")
    parser.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR)
    args = parser.parse_args(argv)
    state = read_state(args.state_dir)
    if args.command == "key":
        if not (state and state.get("api_key")):
            print(f"no API key recorded in {state_path(args.state_dir)}: run `make release` first", file=sys.stderr)
            return 1
        print(state["api_key"])
        return 0
    if args.command == "status":
        if state is None:
            print("no local server recorded")
            return 1
        alive = state_is_alive(state)
        print(f"{'running' if alive else 'NOT running'}: pid {state.get('pid', '-')} {state['url']} "
              f"model {state.get('model_name')} v{state.get('version')}")
        return 0 if alive else 1
    if state is None:
        print(f"no local server recorded in {state_path(args.state_dir)}: nothing to stop")
        return 0
    was_alive = state_is_alive(state)
    stop_server(args.state_dir)
    print(f"stopped local server pid {state['pid']} ({state['url']})" if was_alive
          else f"the local server ({state['url']}) was not running")
    return 0


if __name__ == "__main__":
    sys.exit(main())
