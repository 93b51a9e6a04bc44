"""Where a model comes from: a file path, or a registry URI that follows the MLflow registry.

This is the one reader of the MLflow registry: the server uses it for `--model models:/name@alias`,
and `flows/registry.py` (the release's writer) reuses its tracking-URI default, alias lookup and
download. `DEFAULT_TRACKING_URI` is the one place the default store is named (relative to the
repository root, where `make release` runs): the sqlite database `mlruns/mlflow.db`, artifacts under
`mlruns/artifacts`. `MLFLOW_TRACKING_URI` overrides it. mlflow is imported only for a `models:/...`
URI, so the server image (no mlflow) serves plain files.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

DEFAULT_TRACKING_URI = "sqlite:///mlruns/mlflow.db"
MODELS_SCHEME = "models:/"
ONNX_FILE_NAME = "model.onnx"


class ModelUriError(ValueError):
    """The model cannot be found or fetched; the message says where we looked."""


@dataclass(frozen=True)
class ResolvedModel:
    path: Path
    uri: str
    name: str | None = None
    version: str | None = None
    run_id: str | None = None
    alias: str | None = None


def tracking_uri(explicit: str | None = None) -> str:
    """The MLflow store: `explicit`, else $MLFLOW_TRACKING_URI, else the project's sqlite store."""
    return explicit or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def parse_models_uri(uri: str) -> tuple[str, str | None, str | None]:
    """models:/name@alias -> (name, alias, None); models:/name/3 -> (name, None, "3")."""
    rest = uri[len(MODELS_SCHEME):].strip("/")
    if "@" in rest:
        name, alias = rest.split("@", 1)
        if name and alias and "/" not in alias:
            return name, alias, None
    elif "/" in rest:
        name, version = rest.split("/", 1)
        if name and version.isdigit():
            return name, None, version
    raise ModelUriError(f"{uri!r}: expected models:/<name>@<alias> or models:/<name>/<version>")


def alias_version(client, name: str, alias: str) -> str | None:
    """The version `alias` points at, or None when the model or the alias does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def pick_onnx(directory: Path, what: str) -> Path:
    """The artifact in a downloaded model directory: `model.onnx` if present, else the first .onnx."""
    candidates = sorted(directory.rglob("*.onnx"))
    if not candidates:
        raise ModelUriError(f"{what}: the registered artifact holds no .onnx file (downloaded to {directory})")
    named = [c for c in candidates if c.name == ONNX_FILE_NAME]
    return (named or candidates)[0]


def download_version(client, name: str, version: str, dst_dir: str | Path) -> Path:
    """Download version `version` of `name` from `client`'s store and return `dst_dir/model.onnx`.

    The version's artifact location is asked of this client: MLflow resolves a `models:/` URI through
    its process-wide registry URI, which is whichever store was connected last."""
    import mlflow.artifacts

    dst_dir = Path(dst_dir)
    dst_dir.mkdir(parents=True, exist_ok=True)
    location = client.get_model_version_download_uri(name, version)
    with tempfile.TemporaryDirectory(dir=dst_dir) as scratch:
        local = Path(mlflow.artifacts.download_artifacts(
            artifact_uri=location, dst_path=scratch, tracking_uri=client.tracking_uri
        ))
        found = local if local.suffix == ".onnx" else pick_onnx(local, f"{MODELS_SCHEME}{name}/{version}")
        target = dst_dir / ONNX_FILE_NAME
        shutil.move(str(found), target)
    return target


def connect(store: str):
    """An MlflowClient for tracking and registry on `store`."""
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(store)
    mlflow.set_registry_uri(store)
    return MlflowClient(tracking_uri=store, registry_uri=store)


def resolve_model(uri_or_path: str | Path, dst_dir: str | Path | None = None) -> ResolvedModel:
    """A local .onnx path for a file path or a registry URI (downloaded to `dst_dir`)."""
    text = str(uri_or_path)
    if not text.startswith(MODELS_SCHEME):
        path = Path(text).expanduser()
        if not path.is_file():
            raise ModelUriError(f"{path}: no such model file (export one with scripts/convert_to_onnx.py "
                                "or `make release`, or pass models:/<name>@<alias>)")
        return ResolvedModel(path=path.resolve(), uri=text)
    name, alias, version = parse_models_uri(text)
    try:
        from mlflow.exceptions import MlflowException
    except ImportError:
        raise ModelUriError(
            f"{text}: resolving a registry URI needs mlflow, which this environment lacks "
            "(pip install -r requirements/pipeline.txt), or pass the model file's path"
        ) from None
    store = tracking_uri()
    client = connect(store)
    if alias is not None:
        version = alias_version(client, name, alias)
        if version is None:
            raise ModelUriError(f"{text}: not found in the MLflow registry at {store}: "
                                f"model {name!r} has no alias {alias!r}")
    try:
        run_id = client.get_model_version(name, version).run_id
        path = download_version(client, name, version, dst_dir or tempfile.mkdtemp(prefix="onnxship-model-"))
    except MlflowException as error:
        raise ModelUriError(f"{text}: not found in the MLflow registry at {store}: {error.message}") from None
    return ResolvedModel(path=path, uri=text, name=name, version=version, run_id=run_id, alias=alias)
