"""The `cerebrium` deploy target: stage a bundle, preflight it, run `cerebrium deploy`, wait until live.

    stage_bundle(artifact, settings)   -> a directory holding exactly what Cerebrium builds:
                                          Dockerfile, serving/, requirements/serving-gpu*.txt,
                                          models/model.onnx and a cerebrium.toml rendered from
                                          `CerebriumSettings`
    preflight(bundle, token)           -> every check that can fail in seconds instead of after a
                                          10-minute remote build (port, probe paths, include list,
                                          sha256, token, size, CLI)
    run_cerebrium_deploy(bundle, ...)  -> `cerebrium deploy -y` in the bundle with a clean HOME and
                                          CEREBRIUM_SERVICE_ACCOUNT_TOKEN; output streamed to the log
    deploy_cerebrium(artifact, ...)    -> all of the above, then waits for /ready through the
                                          Cerebrium gateway and returns a `flows.deploy.Endpoint`

Keys (README.md, "Deploy to Cerebrium" has the full picture):
    CEREBRIUM_SERVICE_ACCOUNT_TOKEN  deploys (the CLI)       Prefect Secret `cerebrium-service-account-token`
    CEREBRIUM_API_KEY                calls (gateway, Bearer) Prefect Secret `cerebrium-api-key`
    API_KEY                          the app's own key       Prefect Secret `onnxship-api-key`
                                     (X-API-Key; set the same value as the secret API_KEY in the
                                     Cerebrium dashboard so the server inside the image sees it)
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from serving.artifact import file_sha256

REPO_ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("onnxship.cerebrium")

# The serving image contract (Dockerfile, cerebrium.toml and the server must agree; preflight checks).
SERVER_PORT = 8192
HEALTH_PATH = "/health"  # liveness: the platform restarts the replica when it fails
READY_PATH = "/ready"  # readiness: 503 until the model is loaded (and on CUDA when asked for)
MODEL_PATH_IN_BUNDLE = "models/model.onnx"
DOCKERFILE = "Dockerfile"
DOCKERIGNORE = ".dockerignore"
TOML_NAME = "cerebrium.toml"
MANIFEST_NAME = "bundle.json"  # ours, never uploaded (not in the include list)
GPU_REQUIREMENTS = ("requirements/serving-gpu.txt", "requirements/serving-gpu-cu13.txt")
UPLOAD_LIMIT_BYTES = 2 * 1024**3  # the CLI's upload fails above 2 GB
LIVE_MARKER = "is now live!"

# onnxruntime-gpu >= 1.27 is built for CUDA 13 (driver >= 580); 1.26.0 is the last CUDA 12 build.
CUDA_LINES: dict[str, dict[str, str]] = {
    "12": {"onnxruntime_gpu": "1.26.0", "requirements": "requirements/serving-gpu.txt", "min_driver": "525"},
    "13": {"onnxruntime_gpu": "1.31.1", "requirements": "requirements/serving-gpu-cu13.txt", "min_driver": "580"},
}

# Where the keys come from: environment first, then a Prefect Secret block of this name.
TOKEN_ENV, TOKEN_BLOCK = "CEREBRIUM_SERVICE_ACCOUNT_TOKEN", "cerebrium-service-account-token"
GATEWAY_ENV, GATEWAY_BLOCK = "CEREBRIUM_API_KEY", "cerebrium-api-key"
APP_KEY_ENV, APP_KEY_BLOCK = "API_KEY", "onnxship-api-key"  # the seed's variable, as in the server
CLI_ENV = "CEREBRIUM_CLI"  # optional: path of the cerebrium executable to use

INCLUDE = [DOCKERFILE, "serving/**/*.py", "requirements/serving-gpu*.txt", MODEL_PATH_IN_BUNDLE]
EXCLUDE = [".*", "**/.*", "**/__pycache__/**", "**/*.pyc"]


class CerebriumSettings(BaseModel):
    """Hardware, scaling and app settings, written into the bundle's cerebrium.toml.

    Defaults: one A10 (24 GB, the cheapest Ampere class that runs every artifact here with room
    for batch 32), scale to zero after 5 idle minutes, at most 2 replicas.
    """

    model_config = ConfigDict(extra="forbid")

    app_name: str = Field("onnxship-classifier", pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")
    compute: str = Field("AMPERE_A10", description="Cerebrium GPU class, e.g. TURING_T4, AMPERE_A10, ADA_L4, HOPPER_H100")
    gpu_count: int = Field(1, ge=1, le=8)
    cpu: float = Field(4, gt=0, description="vCPUs per replica (JPEG decoding runs on the CPU)")
    memory: float = Field(16.0, gt=0, description="GB of RAM per replica")
    provider: str = "aws"
    region: str = "us-east-1"
    min_replicas: int = Field(0, ge=0, description="0 = scale to zero (cold starts), >= 1 = always warm (billed 24/7)")
    max_replicas: int = Field(2, ge=1)
    cooldown: int = Field(300, ge=0, description="seconds of low traffic before a replica is removed")
    replica_concurrency: int = Field(
        64, ge=1, description="requests in flight per replica: >= 2 x max_batch_size x workers, so one batch "
        "fills while the previous one runs on the GPU"
    )
    response_grace_period: int = Field(60, ge=1, description="seconds between SIGTERM and SIGKILL")
    cuda: Literal["12", "13"] = Field("12", description="CUDA line of onnxruntime-gpu in the image")
    workers: int = Field(1, ge=1, le=8, description="server worker processes per replica (one model copy each)")
    max_batch_size: int = Field(32, ge=1, le=256)
    batch_timeout: float = Field(0.005, ge=0, le=5, description="seconds a worker waits to fill a batch")
    deploy_timeout_s: float = Field(1800, gt=0, description="upper bound for upload + remote build")
    ready_timeout_s: float = Field(600, gt=0, description="wait for /ready through the gateway (cold start)")
    bundle_dir: Path | None = Field(None, description="where bundles are staged (None: build/cerebrium)")
    cli: str | None = Field(None, description="cerebrium executable (None: $CEREBRIUM_CLI, ~/.cerebrium/bin, PATH)")


class CerebriumError(RuntimeError):
    """One step of the Cerebrium deploy failed; `step` names it, the message says why and what to do."""

    def __init__(self, step: str, message: str):
        super().__init__(f"cerebrium {step}: {message}")
        self.step = step


@dataclass
class Bundle:
    path: Path
    artifact_sha256: str
    settings: CerebriumSettings
    files: list[str] = field(default_factory=list)  # the upload list, relative paths
    size_bytes: int = 0

    @property
    def toml_path(self) -> Path:
        return self.path / TOML_NAME


@dataclass
class DeployResult:
    returncode: int
    output: str
    url: str | None
    project_id: str | None
    dashboard_url: str | None
    seconds: float


# ---------------------------------------------------------------- cerebrium.toml


def toml_document(settings: CerebriumSettings) -> dict[str, Any]:
    """The cerebrium.toml for these settings, as a dict (render_toml writes it)."""
    return {
        "cerebrium": {
            "deployment": {
                "name": settings.app_name,
                "include": list(INCLUDE),
                "exclude": list(EXCLUDE),
                # always explicit: true (the default of some CLI versions) makes the endpoint public
                "disable_auth": False,
            },
            "runtime": {
                "custom": {
                    "dockerfile_path": f"./{DOCKERFILE}",
                    "port": SERVER_PORT,
                    "healthcheck_endpoint": HEALTH_PATH,
                    "readycheck_endpoint": READY_PATH,
                }
            },
            "hardware": {
                "compute": settings.compute,
                "gpu_count": settings.gpu_count,
                "cpu": settings.cpu,
                "memory": settings.memory,
                "provider": settings.provider,
                "region": settings.region,
            },
            "scaling": {
                "min_replicas": settings.min_replicas,
                "max_replicas": settings.max_replicas,
                "cooldown": settings.cooldown,
                "replica_concurrency": settings.replica_concurrency,
                "response_grace_period": settings.response_grace_period,
            },
        }
    }


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string for everything we write
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    raise TypeError(f"cannot write {value!r} to TOML")


def render_toml(settings: CerebriumSettings) -> str:
    doc = toml_document(settings)["cerebrium"]
    lines = [
        "# Rendered by flows/cerebrium.py from CerebriumSettings (release parameters `cerebrium.*`).",
        "# Keys: https://docs.cerebrium.ai/toml-reference/toml-reference",
    ]
    for section, table in (
        ("deployment", doc["deployment"]),
        ("runtime.custom", doc["runtime"]["custom"]),
        ("hardware", doc["hardware"]),
        ("scaling", doc["scaling"]),
    ):
        lines.append("")
        lines.append(f"[cerebrium.{section}]")
        lines.extend(f"{key} = {_toml_value(value)}" for key, value in table.items())
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- include patterns (as the CLI matches them)


def _glob_regex(pattern: str) -> re.Pattern[str]:
    """doublestar-style glob (what the Go CLI uses): ** spans directories, * and ? do not."""
    pattern = pattern.strip().removeprefix("./")
    if pattern.endswith("/"):
        pattern += "*"
    out, i = "", 0
    while i < len(pattern):
        char = pattern[i]
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif char == "*":
            out += "[^/]*"
            i += 1
        elif char == "?":
            out += "[^/]"
            i += 1
        elif char == "{":
            end = pattern.find("}", i)
            if end == -1:
                out += re.escape(char)
                i += 1
            else:
                out += "(?:" + "|".join(re.escape(part) for part in pattern[i + 1 : end].split(",")) + ")"
                i = end + 1
        else:
            out += re.escape(char)
            i += 1
    return re.compile(out + r"\Z")


def upload_files(root: Path, include: list[str], exclude: list[str]) -> list[str]:
    """The files `cerebrium deploy` would upload from `root` (relative, sorted)."""
    selected = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if any(_glob_regex(p).match(rel) for p in include) and not any(_glob_regex(p).match(rel) for p in exclude):
            selected.append(rel)
    return selected


# ---------------------------------------------------------------- Dockerfile


def parse_dockerfile(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        line = (pending + line).strip()
        pending = ""
        if not line:
            continue
        keyword, _, rest = line.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
    return instructions


def dockerfile_facts(text: str) -> dict[str, Any]:
    """What preflight and the tests need from the Dockerfile: args, env, copies, port, command."""
    facts: dict[str, Any] = {"args": {}, "env": {}, "copy_sources": [], "expose": [], "cmd": None,
                             "user": None, "workdir": None, "stopsignal": None, "healthcheck": None}
    for keyword, rest in parse_dockerfile(text):
        if keyword == "ARG":
            name, _, default = rest.partition("=")
            facts["args"][name.strip()] = default.strip().strip('"')
        elif keyword == "ENV":
            for match in re.finditer(r'(\w+)=("(?:[^"\\]|\\.)*"|\S*)', rest):
                value = match.group(2).strip('"')
                scope = {**facts["args"], **facts["env"]}
                facts["env"][match.group(1)] = re.sub(r"\$\{(\w+)\}", lambda m: scope.get(m.group(1), ""), value)
        elif keyword in ("COPY", "ADD"):
            parts = [p for p in rest.split() if not p.startswith("--")]
            facts["copy_sources"].extend(parts[:-1])
        elif keyword == "EXPOSE":
            facts["expose"].extend(int(p.split("/")[0]) for p in rest.split())
        elif keyword in ("CMD", "ENTRYPOINT"):
            facts["cmd"] = json.loads(rest) if rest.startswith("[") else rest
        elif keyword == "USER":
            facts["user"] = rest
        elif keyword == "WORKDIR":
            facts["workdir"] = rest
        elif keyword == "STOPSIGNAL":
            facts["stopsignal"] = rest
        elif keyword == "HEALTHCHECK":
            facts["healthcheck"] = rest
    return facts


def build_args(settings: CerebriumSettings, sha256: str, model_name: str | None = None,
               version: str | None = None) -> dict[str, str]:
    """The Dockerfile ARG defaults a bundle pins (what `docker build --build-arg` would pass)."""
    return {
        "MODEL_SHA256": sha256,
        "CUDA_MAJOR": settings.cuda,
        "WORKERS": str(settings.workers),
        "MAX_BATCH_SIZE": str(settings.max_batch_size),
        "BATCH_TIMEOUT": repr(settings.batch_timeout),
        "MODEL_NAME": _arg_value(model_name or ""),
        "MODEL_VERSION": _arg_value(str(version or "")),
    }


def _arg_value(value: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_.@:+-]*", value):
        raise CerebriumError("stage", f"{value!r} cannot be written into the Dockerfile (letters, digits, _.@:+- only)")
    return value


def pin_build_args(dockerfile_text: str, values: dict[str, str]) -> str:
    """The bundle's Dockerfile: the same file with `ARG NAME=<value>` defaults filled in (Cerebrium
    builds without --build-arg, so the artifact digest and the CUDA line travel as defaults)."""
    for name, value in values.items():
        dockerfile_text, count = re.subn(rf"(?m)^ARG {name}=.*$", f"ARG {name}={value}", dockerfile_text)
        if count != 1:
            raise CerebriumError("stage", f"{DOCKERFILE} must declare exactly one `ARG {name}=` line (found {count})")
    return dockerfile_text


# ---------------------------------------------------------------- staging


def default_bundle_root(settings: CerebriumSettings) -> Path:
    return Path(settings.bundle_dir) if settings.bundle_dir else REPO_ROOT / "build" / "cerebrium"


def stage_bundle(
    artifact_path: str | Path,
    settings: CerebriumSettings | None = None,
    out_dir: str | Path | None = None,
    expected_sha256: str | None = None,
    source_root: Path = REPO_ROOT,
    model_name: str | None = None,
    version: str | None = None,
) -> Bundle:
    """Copy what the image needs into a fresh directory; the artifact's sha256 is pinned into it."""
    settings = settings or CerebriumSettings()
    artifact_path = Path(artifact_path)
    if not artifact_path.is_file():
        raise CerebriumError("stage", f"artifact {artifact_path}: no such file")
    sha = file_sha256(artifact_path)
    if expected_sha256 and sha != expected_sha256.lower():
        raise CerebriumError(
            "stage", f"artifact {artifact_path} has sha256 {sha}, the registry recorded {expected_sha256}: "
            "the file changed after registration; re-run the release"
        )
    out = Path(out_dir) if out_dir else default_bundle_root(settings) / f"{settings.app_name}-{sha[:12]}"
    if out.exists():
        if not (out / MANIFEST_NAME).is_file() and any(out.iterdir()):
            raise CerebriumError("stage", f"{out} exists and is not an onnxship bundle: refusing to overwrite it")
        shutil.rmtree(out)
    out.mkdir(parents=True)

    dockerfile = source_root / DOCKERFILE
    if not dockerfile.is_file():
        raise CerebriumError("stage", f"{dockerfile}: no such file")
    (out / DOCKERFILE).write_text(
        pin_build_args(dockerfile.read_text(), build_args(settings, sha, model_name, version))
    )
    if (source_root / DOCKERIGNORE).is_file():
        shutil.copy2(source_root / DOCKERIGNORE, out / DOCKERIGNORE)
    shutil.copytree(
        source_root / "serving", out / "serving", ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".*")
    )
    for requirement in GPU_REQUIREMENTS:
        if (source_root / requirement).is_file():
            (out / requirement).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source_root / requirement, out / requirement)
    (out / MODEL_PATH_IN_BUNDLE).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(artifact_path, out / MODEL_PATH_IN_BUNDLE)
    (out / TOML_NAME).write_text(render_toml(settings))

    files = upload_files(out, INCLUDE, EXCLUDE)
    size = sum((out / rel).stat().st_size for rel in files)
    manifest = {
        "artifact": str(artifact_path.resolve()),
        "artifact_sha256": sha,
        "app_name": settings.app_name,
        "settings": settings.model_dump(mode="json"),
        "upload_files": files,
        "upload_bytes": size,
        "staged_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (out / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    return Bundle(path=out, artifact_sha256=sha, settings=settings, files=files, size_bytes=size)


# ---------------------------------------------------------------- keys and the CLI


def resolve_secret(env_name: str, block_name: str) -> str | None:
    """The value from the environment, else from the Prefect Secret block (only when a Prefect API
    is reachable: inside a flow run or with PREFECT_API_URL set, never by starting a server)."""
    return secret_with_source(env_name, block_name)[0]


def secret_with_source(env_name: str, block_name: str) -> tuple[str | None, str | None]:
    value = os.environ.get(env_name, "").strip()
    if value:
        return value, f"env {env_name}"
    value = _secret_block(block_name)
    return (value, f"Prefect Secret {block_name}") if value else (None, None)


def _secret_block(block_name: str) -> str | None:
    try:
        from prefect.context import FlowRunContext

        in_flow = FlowRunContext.get() is not None
    except Exception:
        in_flow = False
    if not (in_flow or os.environ.get("PREFECT_API_URL")):
        return None
    try:
        from prefect.blocks.system import Secret

        value = Secret.load(block_name).get()
    except Exception:
        return None
    return str(value).strip() or None


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


def _is_unbootstrapped_launcher(path: Path) -> bool:
    """The `cerebrium` PyPI package installs a Python launcher that downloads the Go CLI into
    ~/.cerebrium/bin on first use (needs internet)."""
    try:
        head = path.read_bytes()[:4096]
    except OSError:
        return False
    return head.startswith(b"#!") and b"cerebrium_cli" in head


def resolve_cli(explicit: str | None = None) -> Path:
    """The Go `cerebrium` binary to run. Order: explicit / $CEREBRIUM_CLI, the launcher's download
    in ~/.cerebrium/bin (run directly, since we run the CLI with a clean HOME), then PATH."""
    candidates: list[Path] = []
    for value in (explicit, os.environ.get(CLI_ENV)):
        if value:
            path = Path(value).expanduser()
            found = shutil.which(str(path)) if not path.is_file() else str(path)
            if not found:
                raise CerebriumError("cli", f"cerebrium CLI {value}: not found or not executable")
            return Path(found)
    downloaded = Path.home() / ".cerebrium" / "bin" / "cerebrium"
    if downloaded.is_file() and os.access(downloaded, os.X_OK):
        candidates.append(downloaded)
    on_path = shutil.which("cerebrium")
    if on_path:
        candidates.append(Path(on_path))
    for candidate in candidates:
        if not _is_unbootstrapped_launcher(candidate):
            return candidate
    if candidates:
        raise CerebriumError(
            "cli", f"{candidates[0]} is the pip launcher and the real CLI has not been downloaded yet: run "
            "`cerebrium version` once on a machine with internet (it installs ~/.cerebrium/bin/cerebrium)"
        )
    raise CerebriumError(
        "cli", "the cerebrium CLI is not installed: `pip install cerebrium && cerebrium version` once with "
        f"internet, or put the binary on PATH / in ${CLI_ENV}"
    )


# ---------------------------------------------------------------- preflight


def prerequisite_problems(settings: CerebriumSettings | None = None, api_key: str | None = None) -> list[str]:
    """What a release with target=cerebrium needs before it spends minutes on export and
    benchmarks: the keys and the CLI (for the release's parameter validation)."""
    settings = settings or CerebriumSettings()
    problems = token_problems(resolve_secret(TOKEN_ENV, TOKEN_BLOCK))
    if not (api_key or resolve_secret(APP_KEY_ENV, APP_KEY_BLOCK)):
        problems.append(f"no app API key: set {APP_KEY_ENV} (or the Prefect Secret block '{APP_KEY_BLOCK}') and the "
                        "same value as the secret API_KEY in the Cerebrium dashboard")
    try:
        resolve_cli(settings.cli)
    except CerebriumError as error:
        problems.append(str(error).removeprefix("cerebrium cli: "))
    return problems


def _server_default_port() -> int | None:
    try:
        from serving.config import ServerConfig

        return int(ServerConfig().port)
    except Exception:
        return None


def _paths_in_server(serving_dir: Path, paths: list[str]) -> list[str]:
    """Probe paths that no module of the server mentions as a route string."""
    source = "\n".join(p.read_text(errors="replace") for p in serving_dir.rglob("*.py"))
    return [path for path in paths if f'"{path}"' not in source and f"'{path}'" not in source]


def preflight(bundle: Bundle, token: str | None, cli: str | None = None, check_cli: bool = True) -> list[str]:
    """Every problem found before any upload; raises CerebriumError('preflight') listing all of them.
    Returns notes (non-fatal) otherwise."""
    problems: list[str] = []
    notes: list[str] = []
    root = bundle.path
    try:
        doc = tomllib.loads((root / TOML_NAME).read_text())["cerebrium"]
    except (OSError, tomllib.TOMLDecodeError, KeyError) as error:
        raise CerebriumError("preflight", f"{root / TOML_NAME}: unreadable cerebrium.toml: {error}") from None
    deployment = doc.get("deployment", {})
    runtime = doc.get("runtime", {}).get("custom", {})

    # auth and name
    if deployment.get("disable_auth", True) is not False:
        problems.append("[cerebrium.deployment] disable_auth must be false (true makes the endpoint public)")
    if deployment.get("name") != bundle.settings.app_name:
        problems.append(f"deployment.name {deployment.get('name')!r} != app_name {bundle.settings.app_name!r}")

    # the port: toml == server default == Dockerfile EXPOSE
    dockerfile_path = root / runtime.get("dockerfile_path", DOCKERFILE)
    facts = dockerfile_facts(dockerfile_path.read_text()) if dockerfile_path.is_file() else None
    port = runtime.get("port")
    server_port = _server_default_port()
    if server_port is not None and port != server_port:
        problems.append(f"[cerebrium.runtime.custom] port {port} != the server's default port {server_port}")
    if facts is not None:
        if port not in facts["expose"]:
            problems.append(f"{DOCKERFILE} EXPOSEs {facts['expose']}, cerebrium.toml routes to port {port}")
        cmd = facts["cmd"] if isinstance(facts["cmd"], list) else []
        image_port = cmd[cmd.index("--port") + 1] if "--port" in cmd[:-1] else facts["env"].get("ONNXSHIP_PORT")
        if image_port is not None and image_port != str(port):
            problems.append(f"{DOCKERFILE} starts the server on port {image_port}, cerebrium.toml routes to {port}")
        if facts["user"] is None or facts["user"].split(":")[0] in ("root", "0"):
            problems.append(f"{DOCKERFILE} runs as root: add a USER")
        if facts["args"].get("MODEL_SHA256") != bundle.artifact_sha256:
            problems.append(f"{DOCKERFILE} pins MODEL_SHA256={facts['args'].get('MODEL_SHA256')!r}, "
                            f"the bundled artifact is {bundle.artifact_sha256}")
    else:
        problems.append(f"dockerfile_path {runtime.get('dockerfile_path')!r}: {dockerfile_path} does not exist")

    # probe paths exist in the server
    for key in ("healthcheck_endpoint", "readycheck_endpoint"):
        if not runtime.get(key):
            problems.append(f"[cerebrium.runtime.custom] {key} is empty (the platform would only probe TCP)")
    probes = [runtime[key] for key in ("healthcheck_endpoint", "readycheck_endpoint") if runtime.get(key)]
    missing = _paths_in_server(root / "serving", probes)
    if missing:
        problems.append(f"serving/ defines no route {', '.join(missing)} (probe paths in cerebrium.toml)")

    # include list: every pattern matches, every COPY source is uploaded, nothing else sneaks in
    include, exclude = deployment.get("include", ["*"]), deployment.get("exclude", [".*"])
    files = upload_files(root, include, exclude)
    for pattern in include:
        if not any(_glob_regex(pattern).match(f) for f in files):
            problems.append(f"include pattern {pattern!r} matches no file in the bundle")
    if facts is not None:
        for source in facts["copy_sources"]:
            if "$" in source:
                continue
            source = source.rstrip("/")
            if not any(f == source or f.startswith(source + "/") or _glob_regex(source).match(f) for f in files):
                problems.append(f"{DOCKERFILE} COPYs {source}, which is not in the upload (include list)")
    stray = [f for f in files if f.split("/")[0] in (".git", ".venv", "venv", "node_modules", "mlruns")]
    if stray:
        problems.append(f"the upload would contain development folders: {', '.join(sorted(set(stray))[:5])}")

    # the artifact
    model = root / MODEL_PATH_IN_BUNDLE
    if not model.is_file():
        problems.append(f"{MODEL_PATH_IN_BUNDLE} is missing from the bundle")
    elif file_sha256(model) != bundle.artifact_sha256:
        problems.append(f"{MODEL_PATH_IN_BUNDLE} sha256 != {bundle.artifact_sha256} (changed after staging)")

    # requirements for the chosen CUDA line
    requirement = CUDA_LINES[bundle.settings.cuda]["requirements"]
    if not (root / requirement).is_file():
        problems.append(f"{requirement} (CUDA {bundle.settings.cuda} line) is missing from the bundle")
    if facts is not None and facts["args"].get("CUDA_MAJOR") != bundle.settings.cuda:
        problems.append(f"{DOCKERFILE} pins CUDA_MAJOR={facts['args'].get('CUDA_MAJOR')!r}, "
                        f"settings ask for {bundle.settings.cuda}")
    if bundle.settings.cuda == "13":
        notes.append("CUDA 13 line (onnxruntime-gpu >= 1.27): needs NVIDIA driver >= 580 on the host; "
                     "this image variant was not built or run here")

    # size
    size = sum((root / f).stat().st_size for f in files)
    if size >= UPLOAD_LIMIT_BYTES:
        problems.append(f"the upload is {size / 1e9:.2f} GB, over Cerebrium's 2 GB limit")
    notes.append(f"upload: {len(files)} files, {size / 1e6:.1f} MB")

    # scaling sanity
    settings = bundle.settings
    if settings.max_replicas < settings.min_replicas:
        problems.append(f"max_replicas {settings.max_replicas} < min_replicas {settings.min_replicas}")
    if settings.replica_concurrency < settings.max_batch_size * settings.workers:
        notes.append(f"replica_concurrency {settings.replica_concurrency} < max_batch_size x workers "
                     f"{settings.max_batch_size * settings.workers}: batches can never fill")

    # credentials and the CLI
    problems.extend(token_problems(token))
    if check_cli:
        try:
            notes.append(f"cli: {resolve_cli(cli or settings.cli)}")
        except CerebriumError as error:
            problems.append(str(error).removeprefix("cerebrium cli: "))

    bundle.files, bundle.size_bytes = files, size
    if problems:
        raise CerebriumError("preflight", f"{len(problems)} problem(s) in {root}:\n  - " + "\n  - ".join(problems))
    return notes


# ---------------------------------------------------------------- running the CLI

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")
_URL = re.compile(r"(https?://[^\s'\"<>]+?/v4/([^/\s]+)/([A-Za-z0-9-]+))(?=[/\s]|$)")


def parse_endpoint(output: str, app_name: str | None = None) -> tuple[str, str] | None:
    """(base URL, project id) from the CLI's output: https://<host>/v4/<project-id>/<app-name>."""
    text = _ANSI.sub("", output)
    after = text.split(LIVE_MARKER, 1)[-1]
    for chunk in (after, text):
        for match in _URL.finditer(chunk):
            url, project, app = match.groups()
            if app_name is None or app == app_name:
                return url, project
    return None


_CLI_ENV_KEEP = {"PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY",
                 "http_proxy", "https_proxy", "no_proxy", "SSL_CERT_FILE", "SSL_CERT_DIR", "CEREBRIUM_ENV",
                 "CEREBRIUM_TELEMETRY_DISABLED"}


def clean_env(home: Path, token: str) -> dict[str, str]:
    """The CLI's environment: an allow-list (PATH, locale, proxies, CA certificates), a fresh HOME
    (no ~/.docker/config.json to upload, no stored login) and the service-account token; never our
    other secrets (API_KEY, CEREBRIUM_API_KEY, MLflow or cloud credentials)."""
    env = {k: v for k, v in os.environ.items() if k in _CLI_ENV_KEEP}
    env.update(HOME=str(home), XDG_CONFIG_HOME=str(home / ".config"), USERPROFILE=str(home),
               NO_COLOR="1", TERM="dumb", CEREBRIUM_SERVICE_ACCOUNT_TOKEN=token)
    return env


def run_cerebrium_deploy(
    bundle: Bundle, token: str, cli: str | Path | None = None, timeout_s: float | None = None, logger: Any = None
) -> DeployResult:
    """`cerebrium deploy -y` in the bundle; success only with exit 0 AND 'is now live!'."""
    logger = logger or log
    cli_path = Path(cli) if cli else resolve_cli(bundle.settings.cli)
    timeout_s = timeout_s or bundle.settings.deploy_timeout_s
    lines: list[str] = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="cerebrium-home-") as home:
        command = [str(cli_path), "deploy", "-y"]
        logger.info("running %s in %s (clean HOME, token from %s)", " ".join(command), bundle.path, TOKEN_ENV)
        try:
            process = subprocess.Popen(
                command, cwd=bundle.path, env=clean_env(Path(home), token), stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, errors="replace",
            )
        except OSError as error:
            raise CerebriumError("cli", f"cannot run {cli_path}: {error}") from None

        def pump() -> None:
            assert process.stdout is not None
            for raw in process.stdout:
                line = _ANSI.sub("", raw.rstrip("\n")).replace(token, "***")
                lines.append(line)
                if line.strip():
                    logger.info("cerebrium | %s", line)

        reader = threading.Thread(target=pump, name="cerebrium-output", daemon=True)
        reader.start()
        try:
            returncode = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGINT)  # the CLI cancels the remote build on SIGINT
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            reader.join(timeout=5)
            raise CerebriumError(
                "build", f"`cerebrium deploy` did not finish within {timeout_s:.0f} s; the build was cancelled. "
                f"Last output:\n{_tail(lines)}"
            ) from None
        reader.join(timeout=10)
    output = "\n".join(lines)
    seconds = time.monotonic() - started
    parsed = parse_endpoint(output, bundle.settings.app_name)
    dashboard = re.search(r"App Dashboard:\s*(\S+)", output)
    result = DeployResult(returncode, output, parsed[0] if parsed else None, parsed[1] if parsed else None,
                          dashboard.group(1) if dashboard else None, seconds)
    _raise_for_result(result, bundle)
    return result


def _tail(lines: list[str], count: int = 15) -> str:
    kept = [line for line in lines if line.strip()][-count:]
    return "\n".join("    " + line for line in kept) or "    (no output)"


def _raise_for_result(result: DeployResult, bundle: Bundle) -> None:
    output, lines = result.output, result.output.splitlines()
    lowered = output.lower()
    live = result.returncode == 0 and LIVE_MARKER in output
    if live and result.url:
        return
    if any(marker in lowered for marker in ("no project configured", "cerebrium login", "token has expired",
                                              "unauthorized", "failed to parse service account token")):
        raise CerebriumError(
            "auth", f"the CLI is not logged in / the token was refused (exit {result.returncode}): set {TOKEN_ENV} to a "
            f"valid service-account token.\n{_tail(lines)}"
        )
    if result.returncode != 0:
        raise CerebriumError("build", f"`cerebrium deploy` failed with exit code {result.returncode}:\n{_tail(lines)}")
    if "build failed" in lowered:  # the Go CLI shows a failed build and still exits 0
        raise CerebriumError("build", f"the remote build failed (the CLI exited 0):\n{_tail(lines)}")
    if LIVE_MARKER not in output:
        cancelled = "cancel" in lowered
        raise CerebriumError(
            "cancelled" if cancelled else "build",
            ("the build was cancelled" if cancelled else "the CLI exited 0 without saying the app is live")
            + f" (exit 0 without '{LIVE_MARKER}'):\n{_tail(lines)}",
        )
    if result.url is None:
        raise CerebriumError(
            "url", f"the app is live but no endpoint URL .../v4/<project-id>/{bundle.settings.app_name} was "
            f"found in the output:\n{_tail(lines)}"
        )


# ---------------------------------------------------------------- the deploy target


def deploy_cerebrium(
    artifact_path: str | Path,
    settings: CerebriumSettings | None = None,
    api_key: str | None = None,
    *,
    expected_sha256: str | None = None,
    gateway_token: str | None = None,
    service_account_token: str | None = None,
    bundle_dir: str | Path | None = None,
    logger: Any = None,
    model_name: str | None = None,
    version: str | None = None,
    **context: Any,
):
    """Stage, preflight, deploy, wait for /ready through the gateway; return a flows.deploy.Endpoint.

    Raises flows.deploy.DeployError whose message starts with 'cerebrium <step>:' (step is one of
    stage, preflight, cli, auth, build, cancelled, url, ready); the CerebriumError is its __cause__.
    """
    from flows.deploy import DeployError, Endpoint

    logger = logger or run_logger()
    settings = settings or CerebriumSettings()
    try:
        token = service_account_token or resolve_secret(TOKEN_ENV, TOKEN_BLOCK)
        app_key, key_source = (api_key, "parameter") if api_key else secret_with_source(APP_KEY_ENV, APP_KEY_BLOCK)
        gateway = gateway_token or resolve_secret(GATEWAY_ENV, GATEWAY_BLOCK)
        if not app_key:
            raise CerebriumError(
                "preflight", f"no app API key: set {APP_KEY_ENV} (or Prefect Secret '{APP_KEY_BLOCK}') and the same "
                "value as secret API_KEY in the Cerebrium dashboard"
            )
        if not gateway:
            gateway = token
            logger.warning("%s not set: calling the endpoint with the service-account token as Bearer", GATEWAY_ENV)

        bundle = stage_bundle(artifact_path, settings, out_dir=bundle_dir, expected_sha256=expected_sha256,
                              model_name=model_name, version=version)
        logger.info("staged %s (artifact sha256 %s)", bundle.path, bundle.artifact_sha256[:12])
        for note in preflight(bundle, token, settings.cli):
            logger.info("preflight: %s", note)
        result = run_cerebrium_deploy(bundle, token, timeout_s=settings.deploy_timeout_s, logger=logger)
        logger.info("deployed %s in %.0f s: %s", settings.app_name, result.seconds, result.url)
        wait_until_ready(result.url, app_key, gateway, settings.ready_timeout_s, logger)
    except CerebriumError as error:
        raise DeployError(str(error)) from error

    app_id = f"{result.project_id}-{settings.app_name}"
    return Endpoint(
        url=result.url,
        target="cerebrium",
        api_key=app_key,
        gateway_token=gateway,
        details={
            "project_id": result.project_id,
            "app_name": settings.app_name,
            "app_id": app_id,
            "api_key_source": key_source,
            "dashboard_url": result.dashboard_url,
            "compute": settings.compute,
            "gpu_count": settings.gpu_count,
            "region": settings.region,
            "artifact_sha256": bundle.artifact_sha256,
            "bundle": str(bundle.path),
            "upload_bytes": bundle.size_bytes,
            "deploy_seconds": round(result.seconds, 1),
            "model_name": model_name,
            "version": version,
            **{k: v for k, v in context.items() if isinstance(v, (str, int, float, bool))},
        },
        stop_hint=(f"cerebrium apps delete {app_id}   (or keep it: with min_replicas=0 idle replicas stop "
                   f"after {settings.cooldown} s)"),
    )


def run_logger() -> Any:
    """Prefect's run logger inside a flow or task run (so the CLI's output lands in the Prefect
    logs and the UI), this module's logger elsewhere."""
    try:
        from prefect import get_run_logger
        from prefect.context import FlowRunContext, TaskRunContext

        if FlowRunContext.get() or TaskRunContext.get():
            return get_run_logger()
    except Exception:
        pass
    return log


def wait_until_ready(url: str, api_key: str | None, gateway_token: str | None, timeout_s: float, logger: Any = None) -> None:
    """Poll GET <url>/ready through the gateway until 200 (cold start: image pull + model load)."""
    from serving.client import ClassifierClient, ClientError

    logger = logger or log
    client = ClassifierClient(url, api_key=api_key, gateway_token=gateway_token, timeout=30.0)
    try:
        client.wait_until_ready(timeout_s)
    except (ClientError, TimeoutError, OSError) as error:
        raise CerebriumError(
            "ready", f"{url}{READY_PATH} did not answer 200 within {timeout_s:.0f} s: {error}. The replica is up but "
            "the model is not serving: check the app logs in the dashboard (sha256 mismatch, or CUDA missing: "
            "the server refuses readiness when the GPU was asked for and ONNX Runtime is not on CUDA)"
        ) from None
    logger.info("%s%s: ready", url, READY_PATH)


def main(argv: list[str] | None = None) -> int:
    """python -m flows.cerebrium stage|preflight|deploy [ARTIFACT | models:/<name>@<alias>]

    stage      build the bundle (build/cerebrium/<app>-<sha>/), nothing else
    preflight  build it and run every check (token, CLI, port, include list, size, sha256)
    deploy     build, check, `cerebrium deploy -y`, wait for /ready; e.g. a rollback:
               python -m flows.cerebrium deploy models:/onnxship-classifier@champion
    """
    import argparse

    parser = argparse.ArgumentParser(prog="python -m flows.cerebrium", description=main.__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(main.__doc__.split("\n")[2:]))
    parser.add_argument("command", choices=["stage", "preflight", "deploy"])
    parser.add_argument("artifact", nargs="?", default=MODEL_PATH_IN_BUNDLE,
                        help=f"an .onnx file or models:/<name>@<alias> (default {MODEL_PATH_IN_BUNDLE})")
    parser.add_argument("--out", default=None, help="bundle directory (default build/cerebrium/<app>-<sha>)")
    parser.add_argument("--app-name", default=None)
    parser.add_argument("--compute", default=None, help="e.g. AMPERE_A10, ADA_L4, HOPPER_H100")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    overrides = {k: v for k, v in (("app_name", args.app_name), ("compute", args.compute)) if v}
    settings = CerebriumSettings(**overrides)
    artifact, name, version = args.artifact, None, None
    if str(artifact).startswith("models:/"):
        from serving.model_uri import resolve_model

        resolved = resolve_model(artifact)
        artifact, name, version = resolved.path, resolved.name, resolved.version
        print(f"{args.artifact} -> {name} v{version} ({artifact})")
    try:
        if args.command == "deploy":
            from flows.deploy import DeployError

            try:
                endpoint = deploy_cerebrium(artifact, settings, bundle_dir=args.out, model_name=name, version=version)
            except DeployError as error:
                print(error)
                return 1
            print(f"live: {endpoint.url}\n  test: python scripts/test_server.py --url {endpoint.url} "
                  f"--api-key $API_KEY --gateway-token ${GATEWAY_ENV}\n  stop: {endpoint.stop_hint}")
            return 0
        bundle = stage_bundle(artifact, settings, out_dir=args.out, model_name=name, version=version)
        print(f"staged {bundle.path}")
        if args.command == "preflight":
            for note in preflight(bundle, resolve_secret(TOKEN_ENV, TOKEN_BLOCK), settings.cli):
                print(f"ok: {note}")
            print(f"preflight passed: cd {bundle.path} && cerebrium deploy -y")
    except CerebriumError as error:
        print(error)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
