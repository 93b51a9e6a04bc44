"""Stage a Cerebrium bundle: a fresh directory holding exactly what Cerebrium builds.

    Dockerfile                 the repository's, with the artifact's sha256, the CUDA line and the
                               batching settings pinned as ARG defaults (Cerebrium passes no --build-arg)
    serving/, requirements/serving-gpu*.txt, models/model.onnx
    cerebrium.toml             rendered from `CerebriumSettings` (tomli_w)
    bundle.json                what was staged (ours: not in the include list, never uploaded)

Also the readers preflight needs: the Dockerfile's facts (dockerfile-parse) and the upload list
(doublestar globs, matched with wcmatch the way the Go CLI matches them).
"""

from __future__ import annotations

import io
import json
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w
from dockerfile_parse import DockerfileParser
from wcmatch import glob

from flows.deploy.cerebrium.contract import (DOCKERFILE, DOCKERIGNORE, EXCLUDE, GPU_REQUIREMENTS, HEALTH_PATH,
                                             INCLUDE, MANIFEST_NAME, MODEL_PATH_IN_BUNDLE, READY_PATH, SERVER_PORT,
                                             TOML_NAME, CerebriumError)
from flows.params import CerebriumSettings
from serving.artifact import file_sha256

REPO_ROOT = Path(__file__).resolve().parents[3]
GLOB_FLAGS = glob.GLOBSTAR | glob.BRACE | glob.DOTGLOB  # doublestar: ** spans directories, dotfiles match


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


# ---------------------------------------------------------------- cerebrium.toml


def toml_document(settings: CerebriumSettings) -> dict[str, Any]:
    """The cerebrium.toml for these settings, as a dict."""
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


def render_toml(settings: CerebriumSettings) -> str:
    header = ("# Rendered by flows/deploy/cerebrium/bundle.py from CerebriumSettings (release parameters `cerebrium.*`).\n"
              "# Keys: https://docs.cerebrium.ai/toml-reference/toml-reference\n\n")
    return header + tomli_w.dumps(toml_document(settings))


# ---------------------------------------------------------------- the upload list


def glob_matches(path: str, pattern: str) -> bool:
    pattern = pattern.strip().removeprefix("./")
    return glob.globmatch(path, pattern + "*" if pattern.endswith("/") else pattern, flags=GLOB_FLAGS)


def upload_files(root: Path, include: list[str], exclude: list[str]) -> list[str]:
    """The files `cerebrium deploy` would upload from `root` (relative, sorted)."""
    selected = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if any(glob_matches(rel, p) for p in include) and not any(glob_matches(rel, p) for p in exclude):
            selected.append(rel)
    return selected


# ---------------------------------------------------------------- the Dockerfile


def parse_dockerfile(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    parser = DockerfileParser(fileobj=io.BytesIO(text.encode()))
    return [(item["instruction"], item["value"]) for item in parser.structure if item["instruction"] != "COMMENT"]


def dockerfile_facts(text: str) -> dict[str, Any]:
    """What preflight and the tests need from the Dockerfile: args, env, copies, port, command."""
    parser = DockerfileParser(fileobj=io.BytesIO(text.encode()))
    facts: dict[str, Any] = {"args": dict(parser.args), "env": dict(parser.envs), "copy_sources": [], "expose": [],
                             "cmd": None, "user": None, "workdir": None, "stopsignal": None, "healthcheck": None}
    for keyword, rest in parse_dockerfile(text):
        if keyword in ("COPY", "ADD"):
            facts["copy_sources"].extend([p for p in rest.split() if not p.startswith("--")][:-1])
        elif keyword == "EXPOSE":
            facts["expose"].extend(int(p.split("/")[0]) for p in rest.split())
        elif keyword in ("CMD", "ENTRYPOINT"):
            facts["cmd"] = json.loads(rest) if rest.startswith("[") else rest
        elif keyword in ("USER", "WORKDIR", "STOPSIGNAL", "HEALTHCHECK"):
            facts[keyword.lower()] = rest
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
        "MODEL_NAME": arg_value(model_name or ""),
        "MODEL_VERSION": arg_value(str(version or "")),
    }


def arg_value(value: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_.@:+-]*", value):
        raise CerebriumError("stage", f"{value!r} cannot be written into the Dockerfile (letters, digits, _.@:+- only)")
    return value


def pin_build_args(dockerfile_text: str, values: dict[str, str]) -> str:
    """The bundle's Dockerfile: the same file, line for line, with `ARG NAME=<value>` defaults filled in."""
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
    prepare_directory(out)
    dockerfile = source_root / DOCKERFILE
    if not dockerfile.is_file():
        raise CerebriumError("stage", f"{dockerfile}: no such file")
    (out / DOCKERFILE).write_text(pin_build_args(dockerfile.read_text(), build_args(settings, sha, model_name, version)))
    if (source_root / DOCKERIGNORE).is_file():
        shutil.copy2(source_root / DOCKERIGNORE, out / DOCKERIGNORE)
    shutil.copytree(source_root / "serving", out / "serving", ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".*"))
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
        "artifact": str(artifact_path.resolve()), "artifact_sha256": sha, "app_name": settings.app_name,
        "settings": settings.model_dump(mode="json"), "upload_files": files, "upload_bytes": size,
        "staged_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (out / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    return Bundle(path=out, artifact_sha256=sha, settings=settings, files=files, size_bytes=size)


def prepare_directory(out: Path) -> None:
    """An empty `out`: a previous bundle there is replaced, anything else is never overwritten."""
    if out.exists():
        if not (out / MANIFEST_NAME).is_file() and any(out.iterdir()):
            raise CerebriumError("stage", f"{out} exists and is not an onnxship bundle: refusing to overwrite it")
        shutil.rmtree(out)
    out.mkdir(parents=True)
