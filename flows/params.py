"""Release parameters: typed, with defaults that work out of the box, validated before any work.

`ReleaseParams` is what the Prefect flow `release` takes (the UI and `prefect deployment run
--params` validate its shape for free); `validate_release_params` then checks the world it points
at (files, ports, the MLflow store) so a bad input fails in seconds, never after an export or a
half-registered model version.
"""

from __future__ import annotations

import importlib
import os
import socket
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from flows.cerebrium import CerebriumSettings

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL_NAME = "onnxship-classifier"
DEFAULT_STATE_DIR = Path(".onnxship")


class ParameterError(ValueError):
    """A release parameter points at something unusable; the message names it and the fix."""


class ServerSettings(BaseModel):
    """How the `local` target runs `python -m serving` (the Cerebrium target has its own)."""

    model_config = ConfigDict(extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(8192, ge=1, le=65535)
    workers: int | None = Field(None, ge=1, le=16, description="None: the server's default (one per core)")
    max_batch_size: int | None = Field(None, ge=1, le=256, description="None: the server's default")
    batch_timeout: float | None = Field(None, ge=0, le=5, description="None: the server's default")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    start_timeout_s: float = Field(180, gt=0, description="seconds to wait for /ready")


class ParitySettings(BaseModel):
    """PyTorch vs ONNX Runtime tolerances (flows.parity.ParityTolerances)."""

    model_config = ConfigDict(extra="forbid")

    min_top1_agreement: float = Field(1.0, ge=0, le=1)
    max_prob_diff: float = Field(1e-4, gt=0)
    batch_sizes: tuple[int, ...] = (1, 4)


class GateThresholds(BaseModel):
    """The validation gate: a candidate becomes champion only if every line holds (parity is
    gated with `ParitySettings`)."""

    model_config = ConfigDict(extra="forbid")

    min_accuracy: float = Field(
        0.75, ge=0, le=1,
        description="top-1 on the reference images with an expected class (the bundled model: 3/4, chelsea.png "
        "reads as 'tiger cat' next to the expected 'Egyptian cat')",
    )
    max_p95_latency_ms: float = Field(250.0, gt=0, description="ORT batch-1 p95, decode included")
    max_accuracy_drop: float = Field(0.0, ge=0, le=1, description="vs champion, same references")
    max_latency_regression_pct: float = Field(
        30.0, ge=0, description="candidate p95 may be at most this % slower than the champion's, same run"
    )


class BenchmarkSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    batch_sizes: tuple[int, ...] = (1, 4, 8)
    duration_s: float = Field(2.0, gt=0, le=600, description="seconds of timed calls per batch size and mode")
    warmup_calls: int = Field(2, ge=0)
    include_torch: bool = True
    threads: int | None = Field(None, ge=1, description="ORT intra-op threads (None: ORT default)")

    @field_validator("batch_sizes")
    @classmethod
    def positive_sizes(cls, sizes: tuple[int, ...]) -> tuple[int, ...]:
        if any(size < 1 for size in sizes):
            raise ValueError("batch_sizes must be positive integers")
        return tuple(sorted(set(sizes) | {1}))  # batch 1 is always measured: the gate's latency figure


class SmokeSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    latency_budget_s: float = Field(2.0, gt=0, description="max round trip per image, seen by the client")
    timeout_s: float = Field(30.0, gt=0, description="HTTP timeout per request")


class ReleaseParams(BaseModel):
    """Everything a release can vary. Every field has a working default."""

    model_config = ConfigDict(extra="forbid")

    arch: str = "efficientnet_lite0"
    weights: Path | None = Field(None, description="PyTorch state dict; None = bundled pretrained default")
    random_init: bool = Field(False, description="seeded random weights (resnets without a weights file; tests)")
    resize_policy: Literal["squash", "center_crop"] | None = None
    opset: int | None = Field(None, ge=7, description="None: flows.export.DEFAULT_OPSET")
    model_name: str = Field(DEFAULT_MODEL_NAME, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
    images_dir: Path | None = Field(None, description="reference images (None: data/images)")
    manifest: Path | None = Field(None, description="reference manifest CSV (None: data/images/manifest.csv)")
    output_dir: Path = Path("models")
    parity: ParitySettings = ParitySettings()
    gate: GateThresholds = GateThresholds()
    benchmark: BenchmarkSettings = BenchmarkSettings()
    target: str = "local"
    server: ServerSettings = ServerSettings()
    cerebrium: CerebriumSettings = CerebriumSettings()
    smoke: SmokeSettings = SmokeSettings()
    tracking_uri: str | None = Field(None, description="None: MLFLOW_TRACKING_URI or sqlite:///mlruns/mlflow.db")
    experiment: str | None = Field(None, description="MLflow experiment (None: the model name)")
    state_dir: Path = Field(DEFAULT_STATE_DIR, description="where the local server's pid/url/key file lives")


def validate_release_params(params: ReleaseParams) -> list[str]:
    """Check every input the release will touch; raise ParameterError listing all problems.

    Returns notes (non-fatal observations) for the log.
    """
    problems: list[str] = []
    notes: list[str] = []
    for check in (check_arch, check_weights, check_references, check_target, check_target_prerequisites, check_port,
                  check_output_dir):
        try:
            note = check(params)
        except ParameterError as error:
            problems.append(str(error))
        else:
            if note:
                notes.append(note)
    try:
        check_mlflow_store(params.tracking_uri)
    except ParameterError as error:
        problems.append(str(error))
    if problems:
        raise ParameterError("invalid release parameters:\n  - " + "\n  - ".join(problems))
    return notes


def check_arch(params: ReleaseParams) -> None:
    from flows.models import ARCHITECTURES

    arch = params.arch
    if arch in ARCHITECTURES:
        if ARCHITECTURES[arch].bundled_weights is None and params.weights is None and not params.random_init:
            raise ParameterError(
                f"arch {arch!r} has no bundled weights: pass weights=<state dict .pth> "
                "(or random_init=true for a throwaway model)"
            )
        return
    if ":" in arch:
        module_name, _, attribute = arch.partition(":")
        try:
            module = importlib.import_module(module_name)
        except Exception as error:
            raise ParameterError(f"arch {arch!r}: cannot import module {module_name!r}: {error}") from None
        if not callable(getattr(module, attribute, None)):
            raise ParameterError(f"arch {arch!r}: module {module_name!r} has no callable {attribute!r}")
        return
    raise ParameterError(
        f"unknown arch {arch!r}: expected one of {', '.join(sorted(ARCHITECTURES))} or 'package.module:callable'"
    )


def check_weights(params: ReleaseParams) -> None:
    weights = params.weights
    if weights is None:
        return
    if not weights.exists():
        raise ParameterError(f"weights {weights}: no such file (pass a PyTorch state dict, or omit it for the default)")
    if not weights.is_file():
        raise ParameterError(f"weights {weights}: not a file")
    if not os.access(weights, os.R_OK):
        raise ParameterError(f"weights {weights}: not readable (permission denied)")
    if weights.stat().st_size == 0:
        raise ParameterError(f"weights {weights}: empty file (0 bytes)")


def reference_paths(params: ReleaseParams) -> tuple[Path, Path]:
    from flows.reference import DEFAULT_IMAGES_DIR, DEFAULT_MANIFEST

    images_dir = params.images_dir if params.images_dir is not None else Path(DEFAULT_IMAGES_DIR)
    manifest = params.manifest if params.manifest is not None else Path(DEFAULT_MANIFEST)
    if params.images_dir is not None and params.manifest is None:
        manifest = images_dir / "manifest.csv"
    return images_dir, manifest


def load_references(params: ReleaseParams):
    from flows.reference import load_reference_set

    images_dir, manifest = reference_paths(params)
    return load_reference_set(images_dir, manifest)


def check_references(params: ReleaseParams) -> None:
    from flows.reference import ReferenceSetError

    images_dir, manifest = reference_paths(params)
    if not manifest.is_file():
        raise ParameterError(f"reference manifest {manifest}: no such file")
    try:
        references = load_references(params)
    except ReferenceSetError as error:
        raise ParameterError(f"reference manifest {manifest}: {error}") from None
    if not references:
        raise ParameterError(f"reference manifest {manifest}: lists no images (add rows: file,class_index,...)")
    missing = [str(ref.path) for ref in references if not Path(ref.path).is_file()]
    if missing:
        raise ParameterError(f"reference manifest {manifest}: names missing files: {', '.join(missing)}")
    if not any(ref.expected_class is not None for ref in references):
        raise ParameterError(
            f"reference manifest {manifest}: no image has an expected class, so accuracy cannot be gated"
        )


def check_target(params: ReleaseParams) -> None:
    from flows.deploy import TARGETS

    if params.target not in TARGETS:
        raise ParameterError(f"unknown deploy target {params.target!r}: expected one of {', '.join(TARGETS)}")


def check_target_prerequisites(params: ReleaseParams) -> None:
    """What a remote target needs (tokens, keys, its CLI), checked before minutes are spent."""
    if params.target != "cerebrium":
        return
    from flows.cerebrium import prerequisite_problems

    problems = prerequisite_problems(params.cerebrium)
    if problems:
        raise ParameterError("deploy target 'cerebrium' is not ready: " + "; ".join(problems))


def check_port(params: ReleaseParams) -> str | None:
    if params.target != "local":
        return None
    from flows.local import read_state, state_is_alive

    state = read_state(params.state_dir)
    host, port = params.server.host, params.server.port
    if state and state_is_alive(state) and int(state.get("port", -1)) == port:
        return f"port {port}: our local server (pid {state['pid']}) will be replaced by the new release"
    if port_in_use(host, port):
        raise ParameterError(
            f"port {port} on {host} is already in use by another process: stop it, or pass "
            "server.port (make release PORT=...)"
        )
    return None


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def check_output_dir(params: ReleaseParams) -> None:
    existing = nearest_existing(params.output_dir)
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ParameterError(f"output_dir {params.output_dir}: cannot be created or written ({existing} is read-only)")


def nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def check_mlflow_store(tracking_uri: str | None) -> None:
    """Fail early when the MLflow store cannot be written (sqlite file / local artifact root)."""
    from flows.registry import local_store_paths, resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    for path in local_store_paths(uri):
        probe = nearest_existing(path)
        if probe.is_file() and probe != path.absolute():
            raise ParameterError(f"MLflow store {uri}: {path} cannot be created: {probe} is a file, not a directory")
        target = probe if probe.is_dir() else probe.parent
        writable = os.access(target, os.W_OK | os.X_OK) and (not probe.is_file() or os.access(probe, os.W_OK))
        if not writable:
            raise ParameterError(
                f"MLflow store {uri}: {path} cannot be written ({probe} is read-only); "
                "fix the permissions or set MLFLOW_TRACKING_URI to a writable store"
            )
