"""MLflow: one run per release, the ONNX artifact as a registered model version, aliases as roles.

- The one MLflow access path of flows/: reading (tracking-URI default, alias lookup, download of a
  version's .onnx) is `serving/model_uri.py`, which the server uses too; writing is here.
- Store: `MLFLOW_TRACKING_URI`, else `serving.model_uri.DEFAULT_TRACKING_URI`
  (`sqlite:///mlruns/mlflow.db`); for a sqlite store the artifacts live in `artifacts/` next to the
  database file (so everything stays inside `mlruns/`).
- Aliases: `candidate` (set on registration), `champion` (what serves), `previous` (the champion
  before it: `make rollback` swaps them). Every version carries `gate.verdict` / `gate.reasons` tags.
- Aliases are read with `get_registered_model` / `get_model_version_by_alias`: `search_model_versions`
  returns versions without their aliases.
- Every call takes the run id explicitly (Prefect tasks may run in other threads, where MLflow's
  "active run" is not the one you think).
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version as package_version
from pathlib import Path
from urllib.parse import unquote, urlparse

from serving.artifact import file_sha256
from serving.model_uri import alias_version, download_version  # noqa: F401  (the one reader, re-exported)
from serving.model_uri import connect as connect_store
from serving.model_uri import tracking_uri as resolve_tracking_uri

CANDIDATE, CHAMPION, PREVIOUS = "candidate", "champion", "previous"
ROLE_TAG = "role"  # what a version is now; kept true by sync_roles after every alias move
OUTCOME_TAG = "release.outcome"  # what its release did: promoted | rejected | failed (history, never changes)
ROLE_AFTER_OUTCOME = {"promoted": "retired", "rejected": "rejected", "failed": "failed"}
MODEL_ARTIFACT_NAME = "model"
RUNTIME_REQUIREMENTS = ("onnxruntime", "numpy", "pillow")


class RegistryError(RuntimeError):
    """The MLflow store or registry refused an operation; the message says which and why."""


@dataclass(frozen=True)
class RegisteredVersion:
    name: str
    version: str
    run_id: str
    experiment_id: str
    model_uri: str  # models:/<name>/<version>
    sha256: str


def sqlite_path(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///"):
        return None
    return Path(unquote(uri[len("sqlite:///"):]))


def local_store_paths(uri: str) -> list[Path]:
    """Local paths a store writes (database file, artifact root); empty for remote stores."""
    db = sqlite_path(uri)
    if db is not None:
        return [db, db.parent / "artifacts"]
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        return [Path(unquote(parsed.path))]
    return []


def artifact_location(uri: str) -> str | None:
    """Where new experiments keep artifacts: `<db dir>/artifacts` for sqlite, server default otherwise."""
    db = sqlite_path(uri)
    if db is None:
        return None
    return (db.parent / "artifacts").absolute().as_uri()


def connect(tracking_uri: str | None = None):
    """Point MLflow at the store (creating a local sqlite store's folder) and return a client bound to it."""
    uri = resolve_tracking_uri(tracking_uri)
    db = sqlite_path(uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    return connect_store(uri)


def ensure_experiment(client, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = artifact_location(client.tracking_uri)
    if location:
        Path(urlparse(location).path).mkdir(parents=True, exist_ok=True)
    return client.create_experiment(name, artifact_location=location)


def git_commit(repo: Path | None = None) -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    if out.returncode != 0:
        return "uncommitted"
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True, timeout=5)
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def pip_requirements() -> list[str]:
    """What a consumer of the logged model needs: the ONNX runtime stack, pinned to what we ran."""
    pins = []
    for name in RUNTIME_REQUIREMENTS:
        try:
            pins.append(f"{name}=={package_version(name)}")
        except PackageNotFoundError:
            pins.append(name)
    return pins


def start_run(client, experiment_id: str, run_name: str, tags: dict[str, str]) -> str:
    run = client.create_run(experiment_id, run_name=run_name, tags=tags)
    return run.info.run_id


def log_params(client, run_id: str, params: dict[str, object]) -> None:
    from mlflow.entities import Param

    client.log_batch(run_id, params=[Param(key, str(value)[:6000]) for key, value in params.items()])


def log_metrics(client, run_id: str, metrics: dict[str, float]) -> None:
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    rows = [Metric(key, float(value), now, 0) for key, value in metrics.items() if value is not None]
    if rows:
        client.log_batch(run_id, metrics=rows)


def log_artifacts(client, run_id: str, artifacts: dict[str, Path | str | dict]) -> None:
    """name -> a dict (logged as JSON), a Path (file or folder, logged under `name`) or text."""
    for name, content in artifacts.items():
        if isinstance(content, dict):
            client.log_dict(run_id, content, name)
        elif isinstance(content, Path):
            client.log_artifact(run_id, str(content), artifact_path=name)
        else:
            client.log_text(run_id, content, name)


def end_run(client, run_id: str, status: str = "FINISHED") -> None:
    client.set_terminated(run_id, status=status)


def log_onnx_model(client, experiment_id: str, run_id: str, onnx_path: Path) -> str:
    """Log the artifact with mlflow.onnx (single file, explicit pip requirements); return its model URI.

    The logged model is created explicitly in the release's experiment: left to itself MLflow puts
    it in the "active" experiment (Default, with artifacts in ./mlruns/0).
    """
    import mlflow.onnx
    import onnx

    model = onnx.load(str(onnx_path))
    logged = client.create_logged_model(experiment_id=experiment_id, name=MODEL_ARTIFACT_NAME, source_run_id=run_id)
    info = mlflow.onnx.log_model(
        model,
        name=MODEL_ARTIFACT_NAME,
        run_id=run_id,
        model_id=logged.model_id,
        pip_requirements=pip_requirements(),
        save_as_external_data=False,
        signature=artifact_signature(onnx_path),
    )
    return info.model_uri


def artifact_signature(onnx_path: Path):
    """The artifact contract as an MLflow signature (shown on the version page): uint8 NHWC in, float32 out."""
    import numpy as np
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    from serving.artifact import INPUT_NAME, LOGITS_NAME, PROBABILITIES_NAME, read_metadata

    meta = read_metadata(onnx_path)
    size, classes = meta.input_size, meta.num_classes
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, size, size, 3), INPUT_NAME)]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, classes), LOGITS_NAME),
                        TensorSpec(np.dtype(np.float32), (-1, classes), PROBABILITIES_NAME)]),
    )


def register_version(client, name: str, model_uri: str, run_id: str, tags: dict[str, str]) -> str:
    """Create (if needed) the registered model and a new version; set `candidate` on it."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description="onnxship image classifier (ONNX, preprocessing in-graph)")
    # a tracking server (REST) accepts a logged-model source `models:/m-<id>` only with its model_id
    model_id = model_uri[len("models:/"):] if model_uri.startswith("models:/m-") else None
    version = client.create_model_version(name, source=model_uri, run_id=run_id, tags=tags, model_id=model_id)
    try:
        client.set_registered_model_alias(name, CANDIDATE, version.version)
    except Exception:
        client.delete_model_version(name, version.version)  # never leave a half-registered version
        raise
    sync_roles(client, name)
    return str(version.version)


def aliases(client, name: str) -> dict[str, str]:
    """alias -> version for a registered model ({} when the model does not exist yet)."""
    from mlflow.exceptions import MlflowException

    try:
        model = client.get_registered_model(name)
    except MlflowException:
        return {}
    return {alias: str(version) for alias, version in (model.aliases or {}).items()}


def version_aliases(client, name: str, version: str) -> list[str]:
    return list(client.get_model_version(name, version).aliases or [])


def tag_version(client, name: str, version: str, tags: dict[str, str]) -> None:
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, str(value)[:5000])


LAST_PROMOTED_TAG = "release.last_promoted"  # registered-model tags: the guard of automatic rollbacks
AUTO_ROLLBACK_FOR_TAG, AUTO_ROLLBACK_AT_TAG = "rollback.auto_for", "rollback.auto_at"


def now() -> str:
    from datetime import datetime, timezone

    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def promote(client, name: str, version: str) -> str | None:
    """Make `version` the champion; the old champion (if any, and different) becomes `previous`."""
    old = alias_version(client, name, CHAMPION)
    if old is not None and old != version:
        client.set_registered_model_alias(name, PREVIOUS, old)
    client.set_registered_model_alias(name, CHAMPION, version)
    tag_version(client, name, version, {"promoted": "true", "promoted_at": now()})
    client.set_registered_model_tag(name, LAST_PROMOTED_TAG, version)
    sync_roles(client, name)
    return old if old != version else None


def rollback(client, name: str, reason: str = "manual", automatic: bool = False) -> tuple[str, str]:
    """Swap `champion` and `previous` (run it again to undo). Returns (from_version, to_version).
    Both versions record what happened; an automatic rollback also records which release it undid."""
    current = alias_version(client, name, CHAMPION)
    previous = alias_version(client, name, PREVIOUS)
    if previous is None:
        raise RegistryError(
            f"model {name!r} has no @previous version to roll back to "
            f"(champion: {current or 'none'}); a rollback needs two promoted releases"
        )
    stamp = now()
    client.set_registered_model_alias(name, CHAMPION, previous)
    if current is not None:
        client.set_registered_model_alias(name, PREVIOUS, current)
        tag_version(client, name, current, {"rolled_back": "true", "rolled_back_at": stamp, "rollback.reason": reason})
    tag_version(client, name, previous, {"restored_at": stamp, "rollback.restored_from": current or "none"})
    if automatic:
        last = client.get_registered_model(name).tags.get(LAST_PROMOTED_TAG, current or "none")
        client.set_registered_model_tag(name, AUTO_ROLLBACK_FOR_TAG, last)
        client.set_registered_model_tag(name, AUTO_ROLLBACK_AT_TAG, stamp)
    sync_roles(client, name)
    return current or "none", previous


def auto_rollback_allowed(client, name: str) -> tuple[bool, str]:
    """Never two automatic rollbacks without a new release in between (a person may always roll back)."""
    tags = client.get_registered_model(name).tags
    last, done = tags.get(LAST_PROMOTED_TAG), tags.get(AUTO_ROLLBACK_FOR_TAG)
    if last is not None and last == done:
        return False, (f"already rolled back automatically after v{last} was promoted ({tags.get(AUTO_ROLLBACK_AT_TAG)}); "
                       "no second automatic rollback until a new release (make rollback still works)")
    return True, f"no automatic rollback since v{last} was promoted"


def sync_roles(client, name: str) -> dict[str, str]:
    """Set every version's `role` tag to what it is now: champion or previous (its alias), else what became
    of its release: retired (promoted once), rejected, failed; a version whose release is still deciding
    is the candidate (or just registered). Returns version -> role."""
    by_version: dict[str, str] = {}
    for alias in (CANDIDATE, PREVIOUS, CHAMPION):  # the later alias wins when a version holds several
        version = alias_version(client, name, alias)
        if version is not None:
            by_version[version] = alias
    roles = {}
    for mv in client.search_model_versions(f"name='{name}'"):
        tags, alias = dict(mv.tags or {}), by_version.get(str(mv.version))
        role = alias if alias in (CHAMPION, PREVIOUS) else ROLE_AFTER_OUTCOME.get(
            tags.get(OUTCOME_TAG, ""), CANDIDATE if alias == CANDIDATE else "registered")
        if tags.get(ROLE_TAG) != role:
            client.set_model_version_tag(name, str(mv.version), ROLE_TAG, role)
        roles[str(mv.version)] = role
    return roles


def register_release(
    client, name: str, experiment_id: str, run_id: str, onnx_path: Path, tags: dict[str, str]
) -> RegisteredVersion:
    """Log the ONNX model to the run and register it; `candidate` points at the new version."""
    model_uri = log_onnx_model(client, experiment_id, run_id, onnx_path)
    version = register_version(client, name, model_uri, run_id, tags)
    return RegisteredVersion(
        name=name, version=version, run_id=run_id, experiment_id=experiment_id,
        model_uri=f"models:/{name}/{version}", sha256=file_sha256(onnx_path),
    )


# MLflow 3's UI opens in its GenAI mode (traces, prompts) unless a link asks for the runs-and-models one
UI_MODE = "workflowType=machine_learning"


def run_link(client, experiment_id: str, run_id: str) -> str:
    """A browser link to the run: the tracking server itself, or `mlflow ui`'s default address."""
    uri = client.tracking_uri
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}?{UI_MODE}"


def ui_command(tracking_uri: str) -> str:
    if tracking_uri.startswith(("http://", "https://")):
        return f"open {tracking_uri}"
    return f".venv/bin/mlflow ui --backend-store-uri {tracking_uri}"


def dumps(value: object) -> str:
    return json.dumps(value, indent=2, sort_keys=True, default=str)
