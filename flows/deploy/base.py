"""What every deploy target shares: the `Target` protocol, the `Endpoint` it returns and its error.

This module is the leaf of `flows/deploy/`: targets import it, the dispatcher imports the targets,
and nothing here imports a target.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from flows.params import ReleaseParams


class DeployError(RuntimeError):
    """A deploy target failed; the message names the step and what to do."""


@dataclass(frozen=True)
class ModelVersion:
    """Which registered version is being deployed (for logs, records and the server's /model)."""

    name: str | None = None
    version: str | None = None
    run_id: str | None = None


@dataclass
class Endpoint:
    url: str
    target: str
    api_key: str | None = field(repr=False)
    gateway_token: str | None = field(default=None, repr=False)
    details: dict = field(default_factory=dict)
    stop_hint: str = ""

    def public(self) -> dict:
        """What may be logged or shown: no secrets."""
        return {"url": self.url, "target": self.target, "details": self.details, "stop_hint": self.stop_hint,
                "api_key_set": bool(self.api_key), "gateway_token_set": bool(self.gateway_token)}


class Target(Protocol):
    """A place a release can serve from."""

    name: str

    def check(self, params: ReleaseParams) -> str | None:
        """Before any work: raise `flows.params.ParameterError` naming what is missing; may return a note."""

    def deploy(self, artifact: Path, params: ReleaseParams, model: ModelVersion) -> Endpoint:
        """Serve `artifact` (the registered file) and return where it serves once it is ready."""
