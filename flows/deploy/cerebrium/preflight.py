"""Preflight: every check that can fail in seconds instead of after a 10-minute remote build (port,
probe paths, include list, sha256, token, size, CLI). All problems are listed at once."""

from __future__ import annotations

import base64
import json
import time
import tomllib
from pathlib import Path
from typing import Any

from flows.deploy.cerebrium import contract
from flows.deploy.cerebrium.bundle import Bundle, dockerfile_facts, glob_matches, upload_files
from flows.deploy.cerebrium.cli import resolve_cli
from flows.deploy.cerebrium.contract import (CUDA_LINES, DEV_FOLDERS, DOCKERFILE, MODEL_PATH_IN_BUNDLE, SERVER_PORT,
                                             TOML_NAME, CerebriumError)
from flows.params import CerebriumSettings
from flows.secrets import APP_KEY, CEREBRIUM_TOKEN, resolve_secret
from serving.artifact import file_sha256
from serving.config import ServerConfig

TOKEN_ENV, TOKEN_BLOCK = CEREBRIUM_TOKEN
DRAIN_MARGIN_S = 5.0
APP_KEY_ENV, APP_KEY_BLOCK = APP_KEY


def jwt_claims(token: str) -> dict[str, Any] | None:
    """The (unverified) claims of a JWT, or None when the token is not a JWT."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        payload = parts[1] + "=" * (-len(parts[1]) % 4)
        claims = json.loads(base64.urlsafe_b64decode(payload))
    except (ValueError, json.JSONDecodeError):
        return None
    return claims if isinstance(claims, dict) else None


def token_problems(token: str | None) -> list[str]:
    if not token:
        return [
            f"no service-account token: set {TOKEN_ENV} (or the Prefect Secret block '{TOKEN_BLOCK}') "
            "to a token from the Cerebrium dashboard -> API keys -> Service accounts"
        ]
    claims = jwt_claims(token)
    if claims is None:
        return [f"{TOKEN_ENV} is not a JWT (three base64url parts separated by dots): copy the whole token"]
    problems = []
    exp = claims.get("exp")
    if isinstance(exp, (int, float)) and exp < time.time():
        problems.append(f"{TOKEN_ENV} expired at {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(exp))}: create a new one")
    project = next((claims[k] for k in ("project_id", "projectId", "sub", "project")
                    if isinstance(claims.get(k), str) and claims[k].startswith("p-")), None)
    if project is None:
        problems.append(f"{TOKEN_ENV} carries no project id (a claim starting with 'p-'): use a service-account token")
    return problems


def prerequisite_problems(settings: CerebriumSettings | None = None) -> list[str]:
    """What a release with target=cerebrium needs before it spends minutes on export and
    benchmarks: the keys and the CLI (for the release's parameter validation)."""
    settings = settings or CerebriumSettings()
    problems = token_problems(resolve_secret(CEREBRIUM_TOKEN))
    if not resolve_secret(APP_KEY):
        problems.append(f"no app API key: set {APP_KEY_ENV} (or the Prefect Secret block '{APP_KEY_BLOCK}') and the "
                        "same value as the secret API_KEY in the Cerebrium dashboard")
    problems.extend(cli_problems(settings.cli))
    return problems


def cli_problems(cli: str | None) -> list[str]:
    try:
        resolve_cli(cli)
    except CerebriumError as error:
        return [str(error).removeprefix("cerebrium cli: ")]
    return []


def preflight(bundle: Bundle, token: str | None, cli: str | None = None, check_cli: bool = True) -> list[str]:
    """Every problem found before any upload; raises CerebriumError('preflight') listing all of them.
    Returns notes (non-fatal) otherwise."""
    root, settings = bundle.path, bundle.settings
    try:
        doc = tomllib.loads((root / TOML_NAME).read_text())["cerebrium"]
    except (OSError, tomllib.TOMLDecodeError, KeyError) as error:
        raise CerebriumError("preflight", f"{root / TOML_NAME}: unreadable cerebrium.toml: {error}") from None
    deployment = doc.get("deployment", {})
    runtime = doc.get("runtime", {}).get("custom", {})
    dockerfile_path = root / runtime.get("dockerfile_path", DOCKERFILE)
    facts = dockerfile_facts(dockerfile_path.read_text()) if dockerfile_path.is_file() else None
    files = upload_files(root, deployment.get("include", ["*"]), deployment.get("exclude", [".*"]))
    size = sum((root / f).stat().st_size for f in files)

    problems = [
        *deployment_problems(deployment, settings),
        *port_problems(runtime.get("port"), facts),
        *image_problems(facts, bundle, dockerfile_path, runtime),
        *probe_problems(runtime, root / "serving"),
        *upload_problems(deployment.get("include", ["*"]), files, facts),
        *artifact_problems(root, bundle.artifact_sha256),
        *cuda_problems(root, facts, settings),
        *token_problems(token),
    ]
    if size >= contract.UPLOAD_LIMIT_BYTES:
        problems.append(f"the upload is {size / 1e9:.2f} GB, over Cerebrium's 2 GB limit")
    if settings.max_replicas < settings.min_replicas:
        problems.append(f"max_replicas {settings.max_replicas} < min_replicas {settings.min_replicas}")
    problems.extend(drain_problems(settings))
    notes = [f"upload: {len(files)} files, {size / 1e6:.1f} MB", *scaling_notes(settings)]
    if settings.cuda == "13":
        notes.append("CUDA 13 line (onnxruntime-gpu >= 1.27): needs NVIDIA driver >= 580 on the host; "
                     "this image variant was not built or run here")
    if check_cli:
        cli_issue = cli_problems(cli or settings.cli)
        problems.extend(cli_issue)
        if not cli_issue:
            notes.append(f"cli: {resolve_cli(cli or settings.cli)}")

    bundle.files, bundle.size_bytes = files, size
    if problems:
        raise CerebriumError("preflight", f"{len(problems)} problem(s) in {root}:\n  - " + "\n  - ".join(problems))
    return notes


def deployment_problems(deployment: dict, settings: CerebriumSettings) -> list[str]:
    problems = []
    if deployment.get("disable_auth", True) is not False:
        problems.append("[cerebrium.deployment] disable_auth must be false (true makes the endpoint public)")
    if deployment.get("name") != settings.app_name:
        problems.append(f"deployment.name {deployment.get('name')!r} != app_name {settings.app_name!r}")
    return problems


def port_problems(port: Any, facts: dict | None) -> list[str]:
    """The port: cerebrium.toml == the server's default == the image's EXPOSE and command."""
    problems = []
    if port != SERVER_PORT:
        problems.append(f"[cerebrium.runtime.custom] port {port} != the server's default port {SERVER_PORT}")
    if facts is None:
        return problems
    if port not in facts["expose"]:
        problems.append(f"{DOCKERFILE} EXPOSEs {facts['expose']}, cerebrium.toml routes to port {port}")
    cmd = facts["cmd"] if isinstance(facts["cmd"], list) else []
    image_port = cmd[cmd.index("--port") + 1] if "--port" in cmd[:-1] else facts["env"].get("ONNXSHIP_PORT")
    if image_port is not None and image_port != str(port):
        problems.append(f"{DOCKERFILE} starts the server on port {image_port}, cerebrium.toml routes to {port}")
    return problems


def image_problems(facts: dict | None, bundle: Bundle, dockerfile_path: Path, runtime: dict) -> list[str]:
    if facts is None:
        return [f"dockerfile_path {runtime.get('dockerfile_path')!r}: {dockerfile_path} does not exist"]
    problems = []
    if facts["user"] is None or facts["user"].split(":")[0] in ("root", "0"):
        problems.append(f"{DOCKERFILE} runs as root: add a USER")
    if facts["args"].get("MODEL_SHA256") != bundle.artifact_sha256:
        problems.append(f"{DOCKERFILE} pins MODEL_SHA256={facts['args'].get('MODEL_SHA256')!r}, "
                        f"the bundled artifact is {bundle.artifact_sha256}")
    return problems


def probe_problems(runtime: dict, serving_dir: Path) -> list[str]:
    """Both probe paths are set and are routes of the server."""
    keys = ("healthcheck_endpoint", "readycheck_endpoint")
    problems = [f"[cerebrium.runtime.custom] {key} is empty (the platform would only probe TCP)"
                for key in keys if not runtime.get(key)]
    source = "\n".join(p.read_text(errors="replace") for p in serving_dir.rglob("*.py"))
    missing = [runtime[key] for key in keys if runtime.get(key)
               and f'"{runtime[key]}"' not in source and f"'{runtime[key]}'" not in source]
    if missing:
        problems.append(f"serving/ defines no route {', '.join(missing)} (probe paths in cerebrium.toml)")
    return problems


def upload_problems(include: list[str], files: list[str], facts: dict | None) -> list[str]:
    """Every include pattern matches, every COPY source is uploaded, no development folder sneaks in."""
    problems = [f"include pattern {pattern!r} matches no file in the bundle"
                for pattern in include if not any(glob_matches(f, pattern) for f in files)]
    for source in (facts or {}).get("copy_sources", []):
        if "$" in source:
            continue
        source = source.rstrip("/")
        if not any(f == source or f.startswith(source + "/") or glob_matches(f, source) for f in files):
            problems.append(f"{DOCKERFILE} COPYs {source}, which is not in the upload (include list)")
    stray = [f for f in files if f.split("/")[0] in DEV_FOLDERS]
    if stray:
        problems.append(f"the upload would contain development folders: {', '.join(sorted(set(stray))[:5])}")
    return problems


def artifact_problems(root: Path, sha256: str) -> list[str]:
    model = root / MODEL_PATH_IN_BUNDLE
    if not model.is_file():
        return [f"{MODEL_PATH_IN_BUNDLE} is missing from the bundle"]
    if file_sha256(model) != sha256:
        return [f"{MODEL_PATH_IN_BUNDLE} sha256 != {sha256} (changed after staging)"]
    return []


def cuda_problems(root: Path, facts: dict | None, settings: CerebriumSettings) -> list[str]:
    """The requirements file of the chosen CUDA line is bundled and the Dockerfile pins that line."""
    problems = []
    requirement = CUDA_LINES[settings.cuda]["requirements"]
    if not (root / requirement).is_file():
        problems.append(f"{requirement} (CUDA {settings.cuda} line) is missing from the bundle")
    if facts is not None and facts["args"].get("CUDA_MAJOR") != settings.cuda:
        problems.append(f"{DOCKERFILE} pins CUDA_MAJOR={facts['args'].get('CUDA_MAJOR')!r}, "
                        f"settings ask for {settings.cuda}")
    return problems


def drain_problems(settings: CerebriumSettings) -> list[str]:
    """A replica scaled down gets SIGTERM, then SIGKILL after response_grace_period: the server's drain
    (--drain-grace, then up to --drain-timeout to answer what it accepted) must end well before that."""
    server = ServerConfig()
    needed = server.drain_grace + server.drain_timeout + DRAIN_MARGIN_S
    if settings.response_grace_period < needed:
        return [f"response_grace_period {settings.response_grace_period} s is shorter than the server's drain "
                f"(--drain-grace {server.drain_grace:g} s + --drain-timeout {server.drain_timeout:g} s + "
                f"{DRAIN_MARGIN_S:g} s margin = {needed:g} s): a scale-down would kill requests it accepted"]
    return []


def scaling_notes(settings: CerebriumSettings) -> list[str]:
    if settings.replica_concurrency < settings.max_batch_size * settings.workers:
        return [f"replica_concurrency {settings.replica_concurrency} < max_batch_size x workers "
                f"{settings.max_batch_size * settings.workers}: batches can never fill"]
    return []
