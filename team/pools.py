"""Container work pools: the deployments of prefect.yaml on a Docker or Kubernetes work pool.

    python -m team pool docker        # make team-pool KIND=docker
    python -m team pool kubernetes    # make team-pool KIND=kubernetes

creates (or updates) the work pool `onnxship-<kind>` from `team/work-pools/<kind>.json` and deploys
every deployment of prefect.yaml onto it, with the pull step's working directory set to where the
pipeline image keeps the project (`/opt/onnxship`, team/worker.Dockerfile). The deployments keep
their names, so this moves them off the process pool; `make prefect-deploy` moves them back.
A worker of that type runs them where the engine exists:
`pip install prefect-docker` (or prefect-kubernetes), then `prefect worker start --pool onnxship-docker`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from team.config import REPO_ROOT, TeamError

TEMPLATES = {kind: REPO_ROOT / "team" / "work-pools" / f"{kind}.json" for kind in ("docker", "kubernetes")}
IMAGE_WORKDIR = "/opt/onnxship"
PREFECT = [sys.executable, "-m", "prefect"]


def prefect(*args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([*PREFECT, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    if check and done.returncode != 0:
        raise TeamError(f"prefect {' '.join(args)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return done


def pool_prefect_file(pool: str, source: Path = REPO_ROOT / "prefect.yaml", names: list[str] | None = None) -> str:
    """prefect.yaml with every (or the named) deployment on `pool`."""
    import yaml

    config = yaml.safe_load(source.read_text())
    deployments = [d for d in config.get("deployments") or [] if not names or d.get("name") in names]
    if not deployments:
        raise TeamError(f"{source}: no deployments" + (f" named {', '.join(names)}" if names else ""))
    for deployment in deployments:
        deployment.setdefault("work_pool", {})["name"] = pool
    config["deployments"] = deployments
    return yaml.safe_dump(config, sort_keys=False)


def api(base: str, method: str, path: str, body: dict | None = None) -> dict | None:
    """One Prefect REST call; None for 404."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"{base.rstrip('/')}{path}", data=data, method=method,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            text = response.read()
    except urllib.error.HTTPError as error:
        if error.code == 404:
            return None
        raise TeamError(f"Prefect API {method} {path}: {error.code} {error.read().decode(errors='replace')[:1000]}") from None
    except OSError as error:
        raise TeamError(f"Prefect API at {base} unreachable: {error}") from None
    return json.loads(text) if text else {}


def upsert_pool(base: str, pool: str, kind: str, template: dict) -> bool:
    """Create the work pool from `template`, or give an existing one this template. True: created."""
    existing = api(base, "GET", f"/work_pools/{pool}")
    if existing is None:
        api(base, "POST", "/work_pools/", {"name": pool, "type": kind, "base_job_template": template,
                                           "description": f"onnxship on {kind} (team/work-pools/{kind}.json)"})
        return True
    if existing.get("type") != kind:
        raise TeamError(f"work pool {pool} exists with type {existing.get('type')}, not {kind}: pass --pool NAME")
    api(base, "PATCH", f"/work_pools/{pool}", {"base_job_template": template})
    return False


def deploy_to_pool(kind: str, pool: str | None = None, workdir: str = IMAGE_WORKDIR,
                   names: list[str] | None = None) -> int:
    if kind not in TEMPLATES:
        raise TeamError(f"unknown work-pool kind {kind!r}: expected one of {', '.join(TEMPLATES)}", 2)
    if not os.environ.get("PREFECT_API_URL"):
        raise TeamError("PREFECT_API_URL is not set: make team-up, then eval \"$(make -s team-env)\"", 2)
    pool = pool or f"onnxship-{kind}"
    template = json.loads(TEMPLATES[kind].read_text())
    if upsert_pool(os.environ["PREFECT_API_URL"], pool, kind, template):
        print(f"work pool {pool} ({kind}) created from {TEMPLATES[kind]}")
    else:
        print(f"work pool {pool}: base job template updated from {TEMPLATES[kind]}")
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="onnxship-prefect-pool-", delete=False) as handle:
        handle.write(pool_prefect_file(pool, names=names))
    try:
        env = {**os.environ, "PWD": workdir}  # prefect.yaml's pull step: set_working_directory {{ $PWD }}
        done = prefect("deploy", "--all", "--prefect-file", handle.name, "--no-prompt", env=env)
    finally:
        Path(handle.name).unlink(missing_ok=True)
    deployed = [line.split("'")[1] for line in done.stdout.splitlines() if "Deployment '" in line and "'" in line]
    print(f"deployed onto {pool} (working directory {workdir} in the image): {', '.join(deployed) or 'see prefect deployment ls'}")
    print(f"run them with a {kind} worker: pip install prefect-{kind}; prefect worker start --pool {pool}")
    return 0
