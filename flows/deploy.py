"""The deploy step: one function, a table of targets. A target takes the registered artifact (a
local .onnx file downloaded from the registry) and returns where it now serves.

    TARGETS = {"local": ..., "cerebrium": ...}

Targets are imported lazily, so a missing optional tool (the Cerebrium CLI) never breaks the others.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from flows.params import ReleaseParams


class DeployError(RuntimeError):
    """A deploy target failed; the message names the step and what to do."""


@dataclass
class Endpoint:
    url: str
    target: str
    api_key: str | None
    gateway_token: str | None = None
    details: dict = field(default_factory=dict)
    stop_hint: str = ""

    def public(self) -> dict:
        """What may be logged or shown: no secrets."""
        return {"url": self.url, "target": self.target, "details": self.details, "stop_hint": self.stop_hint,
                "api_key_set": bool(self.api_key), "gateway_token_set": bool(self.gateway_token)}


def deploy_local_target(artifact_path: Path, params: ReleaseParams, **context) -> Endpoint:
    from flows.local import deploy_local

    return deploy_local(artifact_path, params, **context)


def deploy_cerebrium_target(artifact_path: Path, params: ReleaseParams, **context) -> Endpoint:
    from flows.cerebrium import deploy_cerebrium

    api_key = context.pop("api_key", None) or os.environ.get("API_KEY")
    return deploy_cerebrium(artifact_path, params.cerebrium, api_key=api_key, **context)


TARGETS: dict[str, Callable[..., Endpoint]] = {
    "local": deploy_local_target,
    "cerebrium": deploy_cerebrium_target,
}


def deploy(target: str, artifact_path: Path, params: ReleaseParams, **context) -> Endpoint:
    """Deploy `artifact_path` to `target`; context: model_name, version (for logs and records)."""
    try:
        deploy_to = TARGETS[target]
    except KeyError:
        raise DeployError(f"unknown deploy target {target!r}: expected one of {', '.join(TARGETS)}") from None
    return deploy_to(Path(artifact_path), params, **context)
