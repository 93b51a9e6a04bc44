"""Where a model comes from: a file path, or a registry URI that follows the MLflow registry.

`DEFAULT_TRACKING_URI` is the one place the default MLflow store is named (relative to the
repository root, where `make release` runs): the sqlite database `mlruns/mlflow.db`, artifacts
under `mlruns/artifacts`. `MLFLOW_TRACKING_URI` overrides it. mlflow is imported only for a
`models:/...` URI, so the server image (no mlflow) serves plain files.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

DEFAULT_TRACKING_URI = "sqlite:///mlruns/mlflow.db"
DEFAULT_ARTIFACT_LOCATION = "mlruns/artifacts"
MODELS_SCHEME = "models:/"


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


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


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


def find_onnx(directory: Path, uri: str) -> Path:
    candidates = sorted(directory.rglob("*.onnx"))
    if not candidates:
        raise ModelUriError(f"{uri}: the registered artifact holds no .onnx file (downloaded to {directory})")
    named = [c for c in candidates if c.name == "model.onnx"]
    return (named or candidates)[0]


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
        import mlflow
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise ModelUriError(
            f"{text}: resolving a registry URI needs mlflow, which this environment lacks "
            "(pip install -r requirements/pipeline.txt), or pass the model file's path"
        ) from None
    store = tracking_uri()
    client = MlflowClient(tracking_uri=store, registry_uri=store)
    try:
        found = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
        target = Path(dst_dir or tempfile.mkdtemp(prefix="onnxship-model-"))
        target.mkdir(parents=True, exist_ok=True)
        mlflow.set_registry_uri(store)
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=f"{MODELS_SCHEME}{name}/{found.version}", dst_path=str(target), tracking_uri=store
        )
    except MlflowException as error:
        raise ModelUriError(f"{text}: not found in the MLflow registry at {store}: {error.message}") from None
    local_path = Path(local)
    path = local_path if local_path.suffix == ".onnx" else find_onnx(local_path, text)
    return ResolvedModel(path=path, uri=text, name=name, version=str(found.version), run_id=found.run_id, alias=alias)
