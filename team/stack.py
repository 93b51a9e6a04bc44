"""The team stack on this machine: PostgreSQL (Debian's server binaries, a cluster under TEAM_DIR),
an MLflow tracking server on it that serves artifacts over HTTP (`--serve-artifacts`), and a
Prefect server on the same PostgreSQL (its own database).

    python -m team up | down | status | env

- `up` starts what is not running yet (a second `up` with everything running says so and exits 1);
  a port held by another process is reported before anything starts (exit 2). It waits until
  every service answers, then prints the variables to export.
- `down` stops them by the PIDs recorded at start (PostgreSQL: the PID in its postmaster.pid):
  SIGTERM/SIGINT, then SIGKILL after a timeout. Data stays in TEAM_DIR; the next `up` reuses it.
- Every process is checked before it is signalled: its working directory (MLflow, Prefect) or its
  command line (PostgreSQL: the data directory) must be ours, so a recycled PID is never killed.

PostgreSQL refuses to run as root: as root the cluster runs as the Debian package's `postgres` user
(data directory owned by it), otherwise as the current user. The database password is generated once
(TEAM_DIR/secrets, mode 0600) and reaches MLflow through a pgpass file and Prefect through
PREFECT_SERVER_DATABASE_PASSWORD: never on a command line.

Settings: team/config.py. PostgreSQL: team/postgres.py. Processes and PIDs: team/processes.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from team.config import DB_USER, PG_HOST, PORT_VARIABLES, SERVICES, Config, TeamError, env_exports
from team.postgres import (
    RunAs, ensure_databases, init_cluster, password, pg_bin, pg_ready, start_postgres, write_pgpass,
)
from serving.processes import group_members, log_tail, port_in_use
from team.processes import http_ok, is_running, load_state, postmaster_pid, running_pid, save_state, wait_until


# ---------------------------------------------------------------- MLflow and Prefect

def server_env(config: Config, service: str) -> dict[str, str]:
    env = dict(os.environ)
    if service == "mlflow":
        env.update({
            "PGPASSFILE": str(write_pgpass(config)),
            # MLflow's job runner (GenAI features: prompt optimisation, trace rollups) starts seven
            # huey consumers that ignore SIGTERM; a model registry does not need it
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        })
    else:
        for key in [k for k in env if k.startswith(("PREFECT_SERVER_DATABASE_", "PREFECT_API_DATABASE_"))]:
            del env[key]
        env.update({
            "PREFECT_HOME": str(config.home / "prefect-home"),
            "PREFECT_API_URL": config.prefect_api_url,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_DATABASE_DRIVER": "postgresql+asyncpg",
            "PREFECT_SERVER_DATABASE_HOST": PG_HOST,
            "PREFECT_SERVER_DATABASE_PORT": str(config.pg_port),
            "PREFECT_SERVER_DATABASE_USER": DB_USER,
            "PREFECT_SERVER_DATABASE_NAME": "prefect",
            "PREFECT_SERVER_DATABASE_PASSWORD": password(config),
        })
    return env


def server_command(config: Config, service: str) -> list[str]:
    if service == "mlflow":
        return [sys.executable, "-m", "mlflow", "server",
                "--backend-store-uri", f"postgresql://{DB_USER}@{PG_HOST}:{config.pg_port}/mlflow",
                "--serve-artifacts", "--artifacts-destination", config.artifacts,
                "--default-artifact-root", "mlflow-artifacts:/",
                "--host", config.host, "--port", str(config.mlflow_port), "--workers", str(config.mlflow_workers),
                *(["--allowed-hosts", config.mlflow_allowed_hosts] if config.mlflow_allowed_hosts else [])]
    return [sys.executable, "-m", "prefect", "server", "start", "--host", config.host, "--port", str(config.prefect_port)]


def health_url(config: Config, service: str) -> str:
    return f"{config.mlflow_url}/health" if service == "mlflow" else f"{config.prefect_api_url}/health"


def start_server(config: Config, service: str) -> subprocess.Popen:
    if service == "mlflow" and "://" not in config.artifacts:
        Path(config.artifacts).mkdir(parents=True, exist_ok=True)
    (config.home / "prefect-home").mkdir(parents=True, exist_ok=True)
    log = open(config.logs / f"{service}.log", "ab")
    try:
        return subprocess.Popen(server_command(config, service), cwd=config.home, env=server_env(config, service),
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    finally:
        log.close()


PREFECT_TRACKING_VARIABLE = "mlflow_tracking_uri"


def ensure_prefect_variable(config: Config) -> bool:
    """Create the Prefect variable `mlflow_tracking_uri` (what the Docker/Kubernetes work-pool
    templates in team/work-pools/ put in MLFLOW_TRACKING_URI) unless the team has set it already."""
    base = config.prefect_api_url
    try:
        with urllib.request.urlopen(f"{base}/variables/name/{PREFECT_TRACKING_VARIABLE}", timeout=5):
            return False
    except urllib.error.HTTPError as error:
        if error.code != 404:
            raise
    body = json.dumps({"name": PREFECT_TRACKING_VARIABLE, "value": config.mlflow_url}).encode()
    request = urllib.request.Request(f"{base}/variables/", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=5):
        return True


# ---------------------------------------------------------------- stop

def stop_group(pgid: int, timeout: float, first=signal.SIGTERM) -> None:
    """Signal a process group we started, wait for all of it, SIGKILL what is left after `timeout`."""
    for sig, wait in ((first, timeout), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        if wait_until(lambda: not group_members(pgid), wait):
            return


def stop_postgres(pid: int, timeout: float = 60.0) -> None:
    """Fast shutdown (SIGINT to the postmaster), then immediate (SIGQUIT), then SIGKILL."""
    for sig, wait in ((signal.SIGINT, timeout), (signal.SIGQUIT, 10.0), (signal.SIGKILL, 10.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        if wait_until(lambda: not is_running(pid), wait):
            return


def stop_service(config: Config, service: str, pid: int) -> None:
    if service == "postgres":
        stop_postgres(pid)
    else:
        stop_group(pid, 30.0, signal.SIGINT if service == "prefect" else signal.SIGTERM)


# ---------------------------------------------------------------- commands

def say(message: str = "") -> None:
    print(message, flush=True)


def up(config: Config) -> int:
    state = load_state(config)
    running = {service: running_pid(config, service, state) for service in SERVICES}
    if all(running.values()):
        raise TeamError(
            "the team stack is already running (" + ", ".join(f"{s} pid {running[s]}" for s in SERVICES) + f") in "
            f"{config.home}: nothing started.\n" + "\n".join("  " + line for line in env_exports(config))
            + "\nstop it with `make team-down`", 1)
    missing = [s for s in SERVICES if not running[s]]
    taken = [f"port {config.port(s)} ({s}) on {config.bind_host(s)} is in use by another process: free it or "
             f"set {PORT_VARIABLES[s]}" for s in missing if port_in_use(config.bind_host(s), config.port(s))]
    if taken:
        raise TeamError("cannot start the team stack, nothing started:\n  - " + "\n  - ".join(taken), 2)
    bindir = pg_bin(config) if not running["postgres"] else None
    run_as = RunAs.for_postgres()
    config.home.mkdir(parents=True, exist_ok=True)
    config.logs.mkdir(parents=True, exist_ok=True)
    for service in SERVICES:
        if running[service]:
            say(f"{service}: already running (pid {running[service]})")
    started: dict[str, subprocess.Popen] = {}
    begin = time.monotonic()
    try:
        if not running["postgres"]:
            if init_cluster(config, bindir, run_as):
                say(f"postgres: new cluster in {config.data_dir} (superuser {DB_USER}, password in "
                    f"{config.secrets / 'postgres-password'})")
            process = start_postgres(config, bindir, run_as)
            started["postgres"] = process
            if not wait_until(lambda: pg_ready(config) or process.poll() is not None, config.start_timeout_s, 0.3) \
                    or process.poll() is not None:
                raise TeamError(f"PostgreSQL did not start (log {config.logs / 'postgres.log'}):\n"
                                + log_tail(config.logs / "postgres.log", 25, "    "))
            say(f"postgres: running on {PG_HOST}:{config.pg_port} (pid {process.pid}, PostgreSQL {bindir.parent.name}, "
                f"{time.monotonic() - begin:.1f} s)")
        created = ensure_databases(config)
        if created:
            say(f"postgres: created database(s) {', '.join(created)}")
        servers = [s for s in ("mlflow", "prefect") if not running[s]]
        for service in servers:  # both at once: their first start runs database migrations
            started[service] = start_server(config, service)
        state = load_state(config)
        for service, process in started.items():
            if service != "postgres":
                state[service] = {"pid": process.pid, "port": config.port(service), "started": time.time()}
        state["postgres"] = {"pid": postmaster_pid(config), "port": config.pg_port}
        save_state(config, state)
        pending = list(servers)
        deadline = time.monotonic() + config.start_timeout_s
        while pending:  # poll both: each reports when it answers
            for service in list(pending):
                process = started[service]
                if process.poll() is not None:
                    raise TeamError(f"{service} exited with {process.returncode} (log {config.logs / (service + '.log')}):\n"
                                    + log_tail(config.logs / f"{service}.log", 25, "    "))
                if http_ok(health_url(config, service)):
                    pending.remove(service)
                    url = config.mlflow_url if service == "mlflow" else config.prefect_api_url.removesuffix("/api")
                    say(f"{service}: running at {url} (pid {process.pid}, {time.monotonic() - begin:.1f} s)")
            if pending and time.monotonic() > deadline:
                service = pending[0]
                raise TeamError(f"{service} did not answer {health_url(config, service)} within "
                                f"{config.start_timeout_s:.0f} s (log {config.logs / (service + '.log')}):\n"
                                + log_tail(config.logs / f"{service}.log", 25, "    "))
            if pending:
                time.sleep(0.5)
    except BaseException:
        for service, process in reversed(list(started.items())):
            pid = postmaster_pid(config) if service == "postgres" else process.pid
            if pid and is_running(pid):
                stop_service(config, service, pid)
        state = load_state(config)
        for service in started:
            state.pop(service, None)
        save_state(config, state)
        raise
    try:
        if ensure_prefect_variable(config):
            say(f"prefect: variable {PREFECT_TRACKING_VARIABLE} = {config.mlflow_url} (for the Docker/Kubernetes work pools)")
    except OSError as error:
        say(f"prefect: could not set the variable {PREFECT_TRACKING_VARIABLE}: {error}")
    say()
    say(f"team stack up in {time.monotonic() - begin:.1f} s; data in {config.home}")
    say("export these (or: eval \"$(make -s team-env)\"):")
    for line in env_exports(config):
        say("  " + line)
    say(f"MLflow UI {config.mlflow_url} · Prefect UI {config.prefect_api_url.removesuffix('/api')} · "
        f"artifacts {config.artifacts} · stop: make team-down")
    return 0


def down(config: Config) -> int:
    state = load_state(config)
    stopped, absent = [], []
    for service in reversed(SERVICES):
        pid = running_pid(config, service, state)
        if pid is None:
            absent.append(service)
            continue
        stop_service(config, service, pid)
        stopped.append(f"{service} (pid {pid})")
        state.pop(service, None)
        save_state(config, state)
    if stopped:
        say("stopped " + ", ".join(stopped))
    if absent:
        say("not running: " + ", ".join(absent))
    if config.home.exists():
        say(f"data kept in {config.home} (`make team-up` starts on it again)")
    return 0


def status(config: Config) -> int:
    state = load_state(config)
    all_up = True
    for service in SERVICES:
        pid = running_pid(config, service, state)
        all_up = all_up and pid is not None
        where = {"postgres": f"{PG_HOST}:{config.pg_port}", "mlflow": config.mlflow_url,
                 "prefect": config.prefect_api_url.removesuffix("/api")}[service]
        say(f"{service:9s} {'running, pid ' + str(pid) if pid else 'stopped':22s} {where}")
    say(f"data      {config.home}")
    return 0 if all_up else 1


def env(config: Config) -> int:
    for line in env_exports(config):
        say(line)
    if not all(running_pid(config, s) for s in SERVICES):
        print("# the team stack is not (fully) running: make team-up", file=sys.stderr)
    return 0
