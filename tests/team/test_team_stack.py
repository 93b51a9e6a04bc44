"""Team mode for real, the way a user drives it:

`make team-up` (PostgreSQL + MLflow tracking server with --serve-artifacts + Prefect server), a
second `make team-up` refused, `make release` against the servers, the champion alias read through
MLflow's REST API, the smoke-test deployment run through the Prefect server by a worker, deployments
moved to a Docker and a Kubernetes work pool built from team/work-pools/ (no engine here to run them),
`make team-down`, `make team-up` again on the same data, `models:/onnxship-classifier@champion`
served from a directory with no mlruns/ (the artifact comes over HTTP from the tracking server),
`make team-down`. Every process is stopped by PID, also when the test fails.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests
from support import free_port, stop_process_group

from team.stack import SERVICES, Config, is_running, load_state, postmaster_pid, running_pid

PREFECT = [sys.executable, "-m", "prefect"]
MODEL = "onnxship-classifier"
PG_BINARIES = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"))


# A deployment's job configuration as the worker builds it (BaseJobConfiguration.from_template_and_values),
# with a value from a Prefect Secret block, the way the README tells a team to pass credentials.
RENDER_JOB = """
import asyncio, json, sys
from prefect.blocks.system import Secret
from prefect.client.orchestration import get_client
from prefect.workers.base import BaseJobConfiguration

Secret(value="s3cret-for-tests").save("onnxship-team-test-token", overwrite=True)
template = json.load(open(sys.argv[1]))
values = {"env": {"TEAM_TEST_TOKEN": "{{ prefect.blocks.secret.onnxship-team-test-token }}"}}


async def main():
    async with get_client() as client:
        config = await BaseJobConfiguration.from_template_and_values(template, values, client=client)
    print(json.dumps(config.env))


asyncio.run(main())
"""


# Two promoted versions in a local sqlite store: argv = store URI, model name, an ONNX file.
LOCAL_HISTORY = """
import sys
from pathlib import Path
from flows import registry

uri, name, onnx = sys.argv[1], sys.argv[2], Path(sys.argv[3])
client = registry.connect(uri)
experiment = registry.ensure_experiment(client, name)
for n in range(2):
    run_id = registry.start_run(client, experiment, f"release {n}", {"onnxship.release": "true"})
    registry.log_params(client, run_id, {"arch": "efficientnet_lite0", "n": n})
    registry.log_metrics(client, run_id, {"reference_accuracy": 0.75})
    client.log_text(run_id, f"report {n}", "release_report.md")
    version = registry.register_release(client, name, experiment, run_id, onnx, {"gate.verdict": "pass"})
    registry.promote(client, name, version.version)
    registry.end_run(client, run_id)
print(registry.aliases(client, name))
"""
IMPORTED = "onnxship-imported"


def require_postgres() -> None:
    if PG_BINARIES:
        return
    message = "PostgreSQL server binaries missing: apt-get install -y postgresql (.ci/run installs them)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def make(team, *args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    started = time.monotonic()
    done = subprocess.run(["make", "-s", *args], cwd=team.repo, env=team.env, capture_output=True, text=True,
                          timeout=timeout)
    key = args[0]
    while key in team.timings:
        key += "+"
    team.timings[key] = round(time.monotonic() - started, 1)
    if check:
        assert done.returncode == 0, f"make {' '.join(args)} exited {done.returncode}:\n{done.stdout[-6000:]}\n{done.stderr[-6000:]}"
    return done


def our_pids(config: Config) -> dict[str, int | None]:
    state = load_state(config)
    return {service: running_pid(config, service, state) for service in SERVICES}


@pytest.fixture
def team(repo_root, tmp_path):
    require_postgres()
    # as root PostgreSQL runs as `postgres`, which must be able to enter its data directory
    # (pytest's tmp_path is mode 0700): a world-traversable directory of its own
    home = Path(tempfile.mkdtemp(prefix="onnxship-team-"))
    home.chmod(0o755)
    ports = {"pg": free_port(), "mlflow": free_port(), "prefect": free_port()}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TEAM_", "MLFLOW_", "PREFECT_API_URL"))}
    env.update({
        "TEAM_DIR": str(home), "TEAM_PG_PORT": str(ports["pg"]), "TEAM_MLFLOW_PORT": str(ports["mlflow"]),
        "TEAM_PREFECT_PORT": str(ports["prefect"]),
        "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{ports['mlflow']}",
        "PREFECT_API_URL": f"http://127.0.0.1:{ports['prefect']}/api",
        "PREFECT_HOME": str(tmp_path / "prefect-client"), "PREFECT_LOGGING_LEVEL": "WARNING",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    })
    config = Config.from_env(env)
    state_dir = tmp_path / "state"
    context = SimpleNamespace(repo=repo_root, env=env, config=config, home=home, tmp=tmp_path, state_dir=state_dir,
                              mlflow=env["MLFLOW_TRACKING_URI"], prefect=env["PREFECT_API_URL"], timings={})
    try:
        yield context
    finally:
        from flows.deploy.local import read_state, stop_server

        if read_state(state_dir):
            stop_server(state_dir)
        subprocess.run(["make", "-s", "team-down"], cwd=repo_root, env=env, capture_output=True, timeout=180)
        from team.stack import stop_service

        for service, pid in our_pids(config).items():  # whatever make team-down could not stop
            if pid:
                stop_service(config, service, pid)
        print("timings (s):", json.dumps(context.timings))
        shutil.rmtree(home, ignore_errors=True)


def champion_via_rest(mlflow: str) -> dict:
    response = requests.get(f"{mlflow}/api/2.0/mlflow/registered-models/alias",
                            params={"name": MODEL, "alias": "champion"}, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()["model_version"]


def run_deployment(team, name: str, params: dict) -> str:
    """`prefect deployment run NAME --watch` while a `--run-once` process worker executes it."""
    env = {**team.env, "PREFECT_WORKER_PREFETCH_SECONDS": "1"}  # never a scheduled run minutes ahead
    started = time.monotonic()
    watch = subprocess.Popen([*PREFECT, "deployment", "run", name, "--params", json.dumps(params), "--watch",
                              "--watch-timeout", "300"], cwd=team.repo, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        time.sleep(2)  # let the run be created before the worker polls
        worker_dir = team.tmp / "worker"
        worker_dir.mkdir(exist_ok=True)
        worker = subprocess.run([*PREFECT, "worker", "start", "--pool", "onnxship", "--run-once"], cwd=worker_dir,
                                env=env, capture_output=True, text=True, timeout=360)
        output, _ = watch.communicate(timeout=60)
        assert watch.returncode == 0 and "Completed" in output, \
            f"{name} did not complete:\n{output}\nworker:\n{worker.stdout[-4000:]}\n{worker.stderr[-4000:]}"
        team.timings[f"deployment {name}"] = round(time.monotonic() - started, 1)
        return output
    finally:
        stop_process_group(watch.pid)


def test_team_mode_end_to_end(team, images_dir, default_artifact):
    # ---- up: three servers, the variables to export; a second up is refused
    up = make(team, "team-up")
    assert f"export MLFLOW_TRACKING_URI={team.mlflow}" in up.stdout
    assert f"export PREFECT_API_URL={team.prefect}" in up.stdout
    first_pids = our_pids(team.config)
    assert all(first_pids.values()), first_pids
    assert first_pids["postgres"] == postmaster_pid(team.config)
    again = make(team, "team-up", check=False)
    assert again.returncode != 0 and "already running" in again.stderr, again.stdout + again.stderr
    assert our_pids(team.config) == first_pids
    env_lines = make(team, "team-env").stdout.splitlines()
    assert env_lines == [f"export MLFLOW_TRACKING_URI={team.mlflow}", f"export PREFECT_API_URL={team.prefect}"]

    # ---- a release with the variables set: registry, runs and artifacts on the servers
    params = {"state_dir": str(team.state_dir), "output_dir": str(team.tmp / "models"), "server": {"workers": 1},
              "parity": {"batch_sizes": [1]},
              "benchmark": {"batch_sizes": [1], "duration_s": 0.05, "warmup_calls": 1, "include_torch": False},
              # a 0.05 s sample on a shared CI machine: one stall is the p95 (latency rules: test_gate.py)
              "gate": {"max_p95_latency_ms": 60000}}
    params_file = team.tmp / "release-params.json"
    params_file.write_text(json.dumps(params))
    release = make(team, "release", f"PORT={free_port()}", f"ARGS=--params-file {params_file}")
    assert "PROMOTED to @champion" in release.stdout, release.stdout[-3000:]
    champion = champion_via_rest(team.mlflow)
    assert champion["version"] == "1" and champion["source"].startswith("models:/m-")
    experiment = requests.get(f"{team.mlflow}/api/2.0/mlflow/experiments/get-by-name",
                              params={"experiment_name": MODEL}, timeout=10).json()["experiment"]
    assert experiment["artifact_location"].startswith("mlflow-artifacts:"), experiment
    stored = list((team.home / "mlflow-artifacts").rglob("model.onnx"))
    assert stored, "the ONNX file is not in the tracking server's artifact directory"
    assert not (team.tmp / "mlruns").exists()

    # ---- a local history (a sqlite store, as `make release` writes without team mode) carried over
    local_uri = f"sqlite:///{team.tmp}/local-mlruns/mlflow.db"
    history = subprocess.run([sys.executable, "-c", LOCAL_HISTORY, local_uri, IMPORTED, str(default_artifact)],
                             cwd=team.tmp, env={k: v for k, v in team.env.items() if k != "MLFLOW_TRACKING_URI"},
                             capture_output=True, text=True, timeout=180)
    assert history.returncode == 0, history.stdout + history.stderr
    imported = make(team, "team-import", f"FROM={local_uri}", f"MODEL_NAME={IMPORTED}")
    assert "imported 2 version(s)" in imported.stdout, imported.stdout
    model = requests.get(f"{team.mlflow}/api/2.0/mlflow/registered-models/get", params={"name": IMPORTED},
                         timeout=10).json()["registered_model"]
    assert {a["alias"]: a["version"] for a in model["aliases"]} == {"candidate": "2", "champion": "2", "previous": "1"}
    version = requests.get(f"{team.mlflow}/api/2.0/mlflow/model-versions/get", params={"name": IMPORTED, "version": "1"},
                           timeout=10).json()["model_version"]
    tags = {t["key"]: t["value"] for t in version["tags"]}
    assert tags["imported.from"] == f"{local_uri}#v1" and tags["gate.verdict"] == "pass", tags
    run = requests.get(f"{team.mlflow}/api/2.0/mlflow/runs/get", params={"run_id": version["run_id"]},
                       timeout=10).json()["run"]
    assert {p["key"]: p["value"] for p in run["data"]["params"]}["n"] == "0"
    listed = requests.get(f"{team.mlflow}/api/2.0/mlflow/artifacts/list", params={"run_id": version["run_id"]},
                          timeout=10).json()
    assert "release_report.md" in [f["path"] for f in listed.get("files", [])], listed
    again = make(team, "team-import", f"FROM={local_uri}", f"MODEL_NAME={IMPORTED}")
    assert "imported 0 version(s)" in again.stdout and "already imported as v2" in again.stdout, again.stdout

    # ---- the scheduled smoke test, run now through its deployment on the Prefect server by a worker
    prefect = subprocess.run([*PREFECT, "work-pool", "create", "onnxship", "--type", "process"], cwd=team.repo,
                             env=team.env, capture_output=True, text=True, timeout=120)
    assert prefect.returncode == 0, prefect.stdout + prefect.stderr
    deploy = subprocess.run([*PREFECT, "deploy", "--name", "every-15-minutes", "--no-prompt"], cwd=team.repo,
                            env={**team.env, "PWD": str(team.repo)}, capture_output=True, text=True, timeout=180)
    assert deploy.returncode == 0, deploy.stdout + deploy.stderr
    run_deployment(team, "smoke-test/every-15-minutes", {"state_dir": str(team.state_dir), "latency_budget_s": 5.0})
    smoke_experiment = requests.get(f"{team.mlflow}/api/2.0/mlflow/experiments/get-by-name",
                                    params={"experiment_name": f"{MODEL}-smoke-tests"}, timeout=10).json()["experiment"]
    runs = requests.post(f"{team.mlflow}/api/2.0/mlflow/runs/search",
                         json={"experiment_ids": [smoke_experiment["experiment_id"]]}, timeout=10).json()["runs"]
    tags = {t["key"]: t["value"] for t in runs[0]["data"]["tags"]}
    assert tags["smoke.passed"] == "true" and runs[0]["info"]["status"] == "FINISHED", runs[0]

    # ---- container work pools from the repository's templates (no engine here: created and deployed to)
    pools_started = time.monotonic()
    pool = subprocess.run([sys.executable, "-m", "team", "pool", "docker", "--name", "local", "--name", "every-15-minutes"],
                          cwd=team.repo, env=team.env, capture_output=True, text=True, timeout=300)
    assert pool.returncode == 0, pool.stdout + pool.stderr
    k8s = subprocess.run([sys.executable, "-m", "team", "pool", "kubernetes", "--name", "rollback"], cwd=team.repo,
                         env=team.env, capture_output=True, text=True, timeout=300)
    assert k8s.returncode == 0, k8s.stdout + k8s.stderr
    for name, pool_name in (("release/local", "onnxship-docker"), ("smoke-test/every-15-minutes", "onnxship-docker"),
                            ("rollback/rollback", "onnxship-kubernetes")):
        deployment = requests.get(f"{team.prefect}/deployments/name/{name}", timeout=10).json()
        assert deployment["work_pool_name"] == pool_name, deployment
        assert deployment["pull_steps"][0]["prefect.deployments.steps.set_working_directory"]["directory"] == "/opt/onnxship"
    docker_pool = requests.get(f"{team.prefect}/work_pools/onnxship-docker", timeout=10).json()
    assert docker_pool["type"] == "docker"
    assert docker_pool["base_job_template"] == json.loads((team.repo / "team/work-pools/docker.json").read_text())
    variable = requests.get(f"{team.prefect}/variables/name/mlflow_tracking_uri", timeout=10).json()
    assert variable["value"] == team.mlflow  # what the templates put in MLFLOW_TRACKING_URI
    # what a Docker worker would get: the Prefect variable and a Secret block resolved by the server
    rendered = subprocess.run([sys.executable, "-c", RENDER_JOB, str(team.repo / "team/work-pools/docker.json")],
                              cwd=team.tmp, env=team.env, capture_output=True, text=True, timeout=120)
    assert rendered.returncode == 0, rendered.stdout + rendered.stderr
    job_env = json.loads(rendered.stdout.strip().splitlines()[-1])
    assert job_env["MLFLOW_TRACKING_URI"] == team.mlflow and job_env["TEAM_TEST_TOKEN"] == "s3cret-for-tests", job_env
    team.timings["work pools"] = round(time.monotonic() - pools_started, 1)

    # ---- down by PID; up again on the same data
    from flows.deploy.local import stop_server

    stop_server(team.state_dir)
    down = make(team, "team-down")
    assert "stopped prefect" in down.stdout and "postgres" in down.stdout
    assert not any(is_running(pid) for pid in first_pids.values()), first_pids
    make(team, "team-up")
    assert champion_via_rest(team.mlflow)["version"] == "1"  # the registry survived the restart

    # ---- the serving side follows @champion from a clean directory, over HTTP
    clean = team.tmp / "clean"
    clean.mkdir()
    port = free_port()
    log = open(team.tmp / "serve.log", "wb")
    server = subprocess.Popen([sys.executable, "-m", "serving", "--model", f"models:/{MODEL}@champion", "--host",
                               "127.0.0.1", "--port", str(port), "--workers", "1"], cwd=clean,
                              env={**team.env, "API_KEY": "team-key"}, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        from serving.client import ClassifierClient

        started = time.monotonic()
        with ClassifierClient(f"http://127.0.0.1:{port}", api_key="team-key") as client:
            client.wait_until_ready(timeout=180)
            team.timings["serve champion ready"] = round(time.monotonic() - started, 1)
            info = client.model_info()
            assert info["version"] == "1" and info["name"] == MODEL, info
            prediction = client.predict(images_dir / "coffee.png")
            assert prediction.label, prediction
    finally:
        stop_process_group(server.pid)
        log.close()
    assert not (clean / "mlruns").exists() and not any(clean.iterdir()), list(clean.iterdir())

    down = make(team, "team-down")
    assert "stopped" in down.stdout
    assert not any(our_pids(team.config).values())


def test_port_taken_is_reported_before_anything_starts(tmp_path):
    home = tmp_path / "home"
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        env = {**os.environ, "TEAM_DIR": str(home), "TEAM_PG_PORT": str(free_port()), "TEAM_MLFLOW_PORT": str(taken),
               "TEAM_PREFECT_PORT": str(free_port())}
        done = subprocess.run([sys.executable, "-m", "team", "up"], cwd=Path(__file__).resolve().parents[2], env=env,
                              capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"port {taken} (mlflow)" in done.stderr and "TEAM_MLFLOW_PORT" in done.stderr and "nothing started" in done.stderr
    assert not (home / "postgres").exists()


def test_down_when_nothing_runs(tmp_path):
    env = {**os.environ, "TEAM_DIR": str(tmp_path / "home")}
    done = subprocess.run([sys.executable, "-m", "team", "down"], cwd=Path(__file__).resolve().parents[2], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "not running: prefect, mlflow, postgres" in done.stdout, done.stdout + done.stderr
    status = subprocess.run([sys.executable, "-m", "team", "status"], cwd=Path(__file__).resolve().parents[2], env=env,
                            capture_output=True, text=True, timeout=60)
    assert status.returncode == 1 and "stopped" in status.stdout
