"""The deploy step: one function, a table of targets. A target takes the registered artifact (a
local .onnx file downloaded from the registry) and returns where it now serves.

Each target module imports only `flows.deploy.base` (and `flows.params`), never this dispatcher.
Targets are imported when first asked for, so a local release never loads the Cerebrium code.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from flows.deploy.base import DeployError, Endpoint, ModelVersion, Target
from flows.params import ParameterError, ReleaseParams

TARGETS: dict[str, str] = {  # name -> "module:class"
    "local": "flows.deploy.local:LocalTarget",
    "cerebrium": "flows.deploy.cerebrium.target:CerebriumTarget",
}

__all__ = ["DeployError", "Endpoint", "ModelVersion", "TARGETS", "Target", "deploy", "get_target"]


def get_target(name: str) -> Target:
    if name not in TARGETS:
        raise ParameterError(f"unknown deploy target {name!r}: expected one of {', '.join(TARGETS)}")
    module, _, cls = TARGETS[name].partition(":")
    return getattr(importlib.import_module(module), cls)()


def deploy(target: str, artifact_path: Path, params: ReleaseParams, model: ModelVersion = ModelVersion()) -> Endpoint:
    """Deploy `artifact_path` to `target` and return the endpoint once it is ready."""
    try:
        chosen = get_target(target)
    except ParameterError as error:
        raise DeployError(str(error)) from None
    return chosen.deploy(Path(artifact_path), params, model)
