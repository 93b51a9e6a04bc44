"""Which ONNX Runtime execution providers a session asks for, with which options: a pure function of
the device, the GPU settings and the artifact (no onnxruntime import, no GPU), so that what a GPU
worker asks for is unit-tested on a CPU machine.

TensorRT (`--tensorrt`, before CUDA):
- one optimisation profile for the dynamic batch axis, batch 1 to `--max-batch-size` (optimised for
  the full batch), so one engine serves every batch the worker forms (larger ones are split);
- engine and timing caches under `--trt-cache-dir` (ONNXSHIP_TRT_CACHE_DIR; on Cerebrium the
  persistent volume), engines in one folder per model sha256 + ONNX Runtime version + precision +
  profile, since ONNX Runtime reuses a cached engine without checking that the model changed;
- `--trt-fp16` lets TensorRT pick FP16 kernels (FP16 engines).
CUDA: cuDNN convolution algorithms chosen by heuristics by default (an exhaustive search runs again
for every new batch size, on live requests), copies in the default stream (ONNX Runtime's advice).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"

CUDNN_CONV_ALGO_SEARCH = ("HEURISTIC", "EXHAUSTIVE", "DEFAULT")
DEFAULT_CUDNN_CONV_ALGO_SEARCH = "HEURISTIC"


def default_trt_cache_dir() -> str:
    """Where engines survive a restart when nothing else is configured: the user's cache folder."""
    return str(Path.home() / ".cache" / "onnxship" / "tensorrt")


@dataclass(frozen=True)
class GpuSettings:
    """The GPU side of the server configuration (serving/config.py fills it from flags and env)."""

    tensorrt: bool = False
    trt_fp16: bool = False
    trt_cache_dir: str = field(default_factory=default_trt_cache_dir)
    max_batch_size: int = 32
    cudnn_conv_algo_search: str = DEFAULT_CUDNN_CONV_ALGO_SEARCH


def batch_shape(input_name: str, batch: int, input_size: int) -> str:
    """One TensorRT profile shape of the NHWC uint8 input, e.g. `images:8x224x224x3`."""
    return f"{input_name}:{batch}x{input_size}x{input_size}x3"


def trt_engine_dir(settings: GpuSettings, model_sha256: str, ort_version: str) -> Path:
    """The engine cache folder of one model, ONNX Runtime version, precision and profile."""
    version = re.sub(r"[^0-9A-Za-z.]+", "_", ort_version)
    precision = "fp16" if settings.trt_fp16 else "fp32"
    return Path(settings.trt_cache_dir) / f"{model_sha256[:16]}-ort{version}-{precision}-b1-{settings.max_batch_size}"


def trt_timing_dir(settings: GpuSettings, ort_version: str) -> Path:
    """The timing cache is per layer, not per model: one per ONNX Runtime (hence TensorRT) version."""
    return Path(settings.trt_cache_dir) / f"timing-ort{re.sub(r'[^0-9A-Za-z.]+', '_', ort_version)}"


def execution_providers(device: str, settings: GpuSettings, *, device_id: int, input_name: str, input_size: int,
                        model_sha256: str, ort_version: str) -> list:
    """The `providers` argument of `ort.InferenceSession` for a resolved device ("cpu" or "cuda")."""
    if device != "cuda":
        return [CPU]
    cuda = {
        "device_id": str(device_id),
        "cudnn_conv_algo_search": settings.cudnn_conv_algo_search,
        "do_copy_in_default_stream": "1",
    }
    providers: list = [(CUDA, cuda), CPU]
    if settings.tensorrt:
        tensorrt = {
            "device_id": str(device_id),
            "trt_fp16_enable": "1" if settings.trt_fp16 else "0",
            "trt_engine_cache_enable": "1",
            "trt_engine_cache_path": str(trt_engine_dir(settings, model_sha256, ort_version)),
            "trt_timing_cache_enable": "1",
            "trt_timing_cache_path": str(trt_timing_dir(settings, ort_version)),
            "trt_profile_min_shapes": batch_shape(input_name, 1, input_size),
            "trt_profile_opt_shapes": batch_shape(input_name, settings.max_batch_size, input_size),
            "trt_profile_max_shapes": batch_shape(input_name, settings.max_batch_size, input_size),
        }
        providers.insert(0, (TENSORRT, tensorrt))
    return providers


def cache_folders(providers: list) -> list[Path]:
    """The folders a provider list writes caches to (created before the session opens)."""
    folders = []
    for provider in providers:
        if isinstance(provider, tuple):
            folders += [Path(v) for k, v in provider[1].items() if k.endswith("_cache_path")]
    return folders
