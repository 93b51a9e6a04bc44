"""Release parameters: every setting a release can vary, typed, with defaults that work out of the box.

`ReleaseParams` is what the Prefect flow `release` takes (the UI and `prefect deployment run --params`
validate its shape for free). This module is a leaf: it imports nothing from `flows/`, so every stage
and deploy target can import it. Checking the world the parameters point at (files, ports, the MLflow
store, a target's tokens) is `flows/validate.py`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from serving.config import GPU_DEFAULTS

DEFAULT_MODEL_NAME = "onnxship-classifier"
# where the local server's record lives; a worker may point every flow elsewhere with ONNXSHIP_STATE_DIR
DEFAULT_STATE_DIR = Path(os.environ.get("ONNXSHIP_STATE_DIR") or ".onnxship")


class ParameterError(ValueError):
    """A release parameter points at something unusable; the message names it and the fix."""


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ServerSettings(Settings):
    """How the `local` target runs `python -m serving` (the Cerebrium target has its own)."""

    host: str = "127.0.0.1"
    port: int = Field(8192, ge=1, le=65535)
    workers: int | None = Field(None, ge=1, le=16, description="None: the server's default (one per core)")
    max_batch_size: int | None = Field(None, ge=1, le=256, description="None: the server's default")
    batch_timeout: float | None = Field(None, ge=0, le=5, description="None: the server's default")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    start_timeout_s: float = Field(180, gt=0, description="seconds to wait for /ready")


class ParitySettings(Settings):
    """PyTorch vs ONNX Runtime tolerances (flows.stages.parity.ParityTolerances)."""

    min_top1_agreement: float = Field(1.0, ge=0, le=1)
    max_prob_diff: float = Field(1e-4, gt=0)
    batch_sizes: tuple[int, ...] = (1, 4)


class GateThresholds(Settings):
    """The validation gate: a candidate becomes champion only if every line holds (parity is
    gated with `ParitySettings`)."""

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


class VariantBudget(Settings):
    """When a reduced-precision variant (int8, fp16) may replace fp32: the gate takes the fastest variant
    for the target's device that stays inside every line (README "Variants: int8 and fp16")."""

    min_top1_agreement: float = Field(
        0.95, ge=0, le=1, description="top-1 agreement with PyTorch on the evaluation images (int8 measured: 95.5%)")
    max_accuracy_drop: float = Field(
        0.02, ge=0, le=1, description="top-1 accuracy drop vs fp32 on the labelled evaluation images (one image "
        "of 67 is 1.5 points)")
    min_eval_images: int = Field(50, ge=1, description="fewer evaluation images: fp32 is kept, the variant not built")
    min_speedup: float = Field(
        1.05, gt=0, description="times fp32's speed at batch 1, measured here (CPU targets; unmeasured on cuda targets)")
    calibration_count: int = Field(64, ge=1, description="int8: at most this many calibration images")
    min_calibration_images: int = Field(16, ge=1, description="int8: fewer readable calibration images refuse it")


class BenchmarkSettings(Settings):
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


class SmokeSettings(Settings):
    latency_budget_s: float = Field(2.0, gt=0, description="max round trip per image, seen by the client")
    timeout_s: float = Field(30.0, gt=0, description="HTTP timeout per request")


class CerebriumSettings(Settings):
    """Hardware, scaling and app settings, written into the bundle's cerebrium.toml.

    Defaults: one A10 (24 GB, the cheapest Ampere class that runs every artifact here with room
    for batch 32), scale to zero after 5 idle minutes, at most 2 replicas. The server's batching
    defaults are the GPU defaults of `serving.config`.
    """

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
    workers: int = Field(GPU_DEFAULTS["workers"], ge=1, le=8,
                         description="server worker processes per replica (one model copy each)")
    max_batch_size: int = Field(GPU_DEFAULTS["max_batch_size"], ge=1, le=256)
    batch_timeout: float = Field(GPU_DEFAULTS["batch_timeout"], ge=0, le=5,
                                 description="seconds a worker waits to fill a batch")
    deploy_timeout_s: float = Field(1800, gt=0, description="upper bound for upload + remote build")
    ready_timeout_s: float = Field(600, gt=0, description="wait for /ready through the gateway (cold start)")
    bundle_dir: Path | None = Field(None, description="where bundles are staged (None: build/cerebrium)")
    cli: str | None = Field(None, description="cerebrium executable (None: $CEREBRIUM_CLI, ~/.cerebrium/bin, PATH)")


class ReleaseParams(Settings):
    """Everything a release can vary. Every field has a working default."""

    arch: str = "efficientnet_lite0"
    weights: Path | None = Field(None, description="PyTorch state dict; None = bundled pretrained default")
    random_init: bool = Field(False, description="seeded random weights (resnets without a weights file; tests)")
    resize_policy: Literal["squash", "center_crop"] | None = None
    opset: int | None = Field(None, ge=7, description="None: flows.stages.export.DEFAULT_OPSET")
    model_name: str = Field(DEFAULT_MODEL_NAME, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
    images_dir: Path | None = Field(None, description="reference images (None: data/images)")
    manifest: Path | None = Field(None, description="reference manifest CSV (None: data/images/manifest.csv)")
    output_dir: Path = Path("models")
    parity: ParitySettings = ParitySettings()
    gate: GateThresholds = GateThresholds()
    variants: tuple[Literal["fp32", "int8", "fp16"], ...] | None = Field(
        None, description="precisions to build (fp32 always): None = fp32,int8 for a CPU target, fp32,fp16 for cuda")
    eval_images: Path | None = Field(
        None, description="folder with manifest.csv (file[,class_index]) judging the variants (None: the reference images)")
    calibration_images: Path | None = Field(
        None, description="int8 calibration images (None or = eval_images: every third evaluation image, kept out of it)")
    variant_budget: VariantBudget = VariantBudget()
    benchmark: BenchmarkSettings = BenchmarkSettings()
    target: str = "local"
    server: ServerSettings = ServerSettings()
    cerebrium: CerebriumSettings = CerebriumSettings()
    smoke: SmokeSettings = SmokeSettings()
    tracking_uri: str | None = Field(None, description="None: MLFLOW_TRACKING_URI or sqlite:///mlruns/mlflow.db")
    experiment: str | None = Field(None, description="MLflow experiment (None: the model name)")
    state_dir: Path = Field(DEFAULT_STATE_DIR, description="where the local server's pid/url/key file lives")

    @field_validator("variants")
    @classmethod
    def fp32_first(cls, variants: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if variants is None:
            return None
        return ("fp32", *sorted(set(variants) - {"fp32"}, key=("int8", "fp16").index))  # fp32: the baseline
