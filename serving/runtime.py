"""ONNX Runtime inference for an onnxship artifact: provider choice, tuned sessions, top-k.

Provider policy (`device`):
- "cpu":  CPUExecutionProvider only.
- "cuda": CUDA (TensorRT first when `gpu.tensorrt`), CPU kept only for the few ops a GPU EP
          hands back. If the session ends up without CUDA, that is an error (DeviceError).
          Provider options: serving/providers.py.
- "auto": "cuda" when the onnxruntime-gpu build offers CUDA and a GPU is visible, else "cpu".
          A silent fallback to CPU is detected, logged and reported in `.providers`.

ONNX Runtime never raises when a GPU provider fails to load: it logs and runs on CPU. The
session's `get_providers()` is the only truth, so `Classifier.providers` reports exactly that.

CPU tuning: each server worker gets its own session with `intra_op_threads` threads (server
default: twice the worker's share of the cores, see serving/config.py), one inter-op thread, a
policy for how those threads wait for work (`spinning`, SPINNING below) and full graph
optimisation. GPU path: the graph takes uint8 NHWC, so the host ships 1 byte per pixel channel
instead of 4; inputs and outputs are bound with IOBinding.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
from dataclasses import replace
from functools import cached_property
from pathlib import Path

import numpy as np

from serving.artifact import (INPUT_NAME, LOGITS_NAME, PROBABILITIES_NAME, ArtifactMetadata, file_sha256, open_session,
                              session_metadata)
from serving.cpus import cores_to_spare, cpu_count
from serving.images import DEFAULT_MAX_PIXELS, load_image
from serving.providers import CPU, CUDA, TENSORRT, GpuSettings, cache_folders, execution_providers

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")
__all__ = ["CPU", "CUDA", "TENSORRT", "Classifier", "DeviceError", "GpuSettings", "resolve_device", "top_k"]


class DeviceError(RuntimeError):
    """The requested device cannot be used; the message says what is missing."""


def visible_gpu_count() -> int:
    """GPUs this process may use, without torch: `nvidia-smi -L`, else the /dev/nvidiaN device
    files (containers do not always ship nvidia-smi), limited by CUDA_VISIBLE_DEVICES."""
    count = 0
    if shutil.which("nvidia-smi") is not None:
        try:
            out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20, check=True).stdout
            count = sum(1 for line in out.splitlines() if line.startswith("GPU"))
        except (subprocess.SubprocessError, OSError):
            count = 0
    if count == 0:
        count = sum(1 for p in Path("/dev").glob("nvidia[0-9]*") if p.name[len("nvidia"):].isdigit())
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = [v for v in visible.split(",") if v.strip() and v.strip() != "-1"]
        count = min(count, len(ids))
    return count


def cuda_available() -> bool:
    import onnxruntime as ort

    return CUDA in ort.get_available_providers() and visible_gpu_count() > 0


def resolve_device(device: str) -> str:
    """Map "auto" to "cuda" or "cpu"; check that "cuda" can work at all."""
    import onnxruntime as ort

    if device not in DEVICES:
        raise DeviceError(f"unknown device {device!r}: expected one of {', '.join(DEVICES)}")
    if device == "cpu":
        return "cpu"
    has_cuda_build = CUDA in ort.get_available_providers()
    gpus = visible_gpu_count() if has_cuda_build else 0
    if device == "auto":
        return "cuda" if gpus > 0 else "cpu"
    if not has_cuda_build:
        raise DeviceError(
            f"--device cuda: this onnxruntime {ort.__version__} build has no CUDAExecutionProvider "
            f"(available: {', '.join(ort.get_available_providers())}); install onnxruntime-gpu "
            "(requirements/serving-gpu.txt) or use --device cpu"
        )
    if gpus == 0:
        raise DeviceError(
            "--device cuda: no GPU visible (neither nvidia-smi nor /dev/nvidia* shows one, or "
            "CUDA_VISIBLE_DEVICES hides them); use --device cpu or auto"
        )
    return "cuda"


# How ORT's intra-op threads wait for work between the parallel sections of a model call
# (`--ort-spinning`; README, "ORT thread spinning"):
#   "off"    sleep: the least CPU; on this 2-vCPU VM each wake-up costs enough that a batch-1 call
#            of EfficientNet-Lite0 takes 6 ms instead of 4.5. The CPU default outside the server.
#   "run"    spin while a call lasts and stop the moment it returns (session.force_spinning_stop).
#            Fast, but two workers spinning at once on the same cores slow each other down.
#   "alone"  two sessions, "run" and "off": a call spins only when the cores it needs are free at
#            that moment (nothing else runnable: a lone request), else sleeps. The server's CPU default.
#   "on"     ORT's default: also keep spinning for a while after a call; with CUDA, whose few CPU
#            threads only launch kernels and do not compete with decoding.
SPINNING = ("alone", "run", "on", "off")


def default_spinning(device: str) -> str:
    return "on" if device == "cuda" else "off"


def cpu_session_options(intra_op_threads: int | None = None, spinning: str = "off"):
    import onnxruntime as ort

    if spinning not in SPINNING or spinning == "alone":
        raise ValueError(f"spinning {spinning!r}: expected run, on or off")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = intra_op_threads or cpu_count()
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0" if spinning == "off" else "1")
    if spinning == "run":
        options.add_session_config_entry("session.force_spinning_stop", "1")
    options.log_severity_level = 3  # errors only; provider fallbacks are reported by us
    return options


def top_k(probabilities_row: np.ndarray, k: int) -> list[tuple[int, float]]:
    """The k most likely classes of one row, most likely first, as (class_id, confidence)."""
    row = np.asarray(probabilities_row).reshape(-1)
    k = max(1, min(int(k), row.shape[0]))
    idx = np.argpartition(-row, k - 1)[:k]
    idx = idx[np.argsort(-row[idx], kind="stable")]
    return [(int(i), float(row[i])) for i in idx]


class Classifier:
    """One ONNX Runtime session over an onnxship artifact, with the artifact's own preprocessing."""

    def __init__(
        self,
        model_path: str | Path,
        device: str = "auto",
        intra_op_threads: int | None = None,
        device_id: int = 0,
        gpu: GpuSettings | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        spinning: str | None = None,
    ):
        self.model_path = Path(model_path)
        self.requested_device = device
        self.device = resolve_device(device)
        self.device_id = device_id
        self.max_pixels = max_pixels
        self.spinning = spinning or default_spinning(self.device)
        if self.spinning == "alone" and self.device == "cuda":
            self.spinning = "on"
        options = cpu_session_options(intra_op_threads, "off" if self.spinning == "alone" else self.spinning)
        gpu = gpu or GpuSettings()
        tensorrt = gpu.tensorrt and self.device == "cuda"
        providers = self._providers(gpu) if self.device == "cuda" else [CPU]
        self.trt_cache = trt_cache_state(providers) if tensorrt else None
        self.session = open_session(self.model_path, options, providers)
        # "alone": the same model with spinning threads, for calls that have the cores to themselves
        # (with one thread there is no pool to spin: the second session would only cost memory)
        self.spinning_session = (open_session(self.model_path, cpu_session_options(intra_op_threads, "run"), providers)
                                 if self.spinning == "alone" and options.intra_op_num_threads > 1 else None)
        self.metadata: ArtifactMetadata = session_metadata(self.session, self.model_path)
        self.providers: list[str] = list(self.session.get_providers())
        self.intra_op_threads = options.intra_op_num_threads
        self.cores = cpu_count()
        # the TensorRT profile ends at the max batch size: a larger batch (a big request on top of a
        # nearly full batch) runs in pieces instead of making TensorRT build another engine
        self.max_batch = gpu.max_batch_size if TENSORRT in self.providers else None
        if self.trt_cache is not None:
            self.trt_cache["engines_after"] = count_engines(self.trt_cache["engine_dir"])
        wanted = providers[0][0] if isinstance(providers[0], tuple) else providers[0]
        if self.device == "cuda" and CUDA not in self.providers and TENSORRT not in self.providers:
            message = (
                f"ONNX Runtime fell back to CPU: asked for {wanted}, got {self.providers} "
                "(CUDA/cuDNN libraries missing or incompatible with this onnxruntime-gpu build)"
            )
            if device == "cuda":
                raise DeviceError(message + "; refusing to serve on CPU with --device cuda")
            log.warning(message)
            self.device = "cpu"
        elif tensorrt and TENSORRT not in self.providers:
            log.warning("TensorRT was requested but is not active (providers: %s): the TensorRT libraries "
                        "(libnvinfer) are missing or do not match this onnxruntime-gpu build", self.providers)
        self._check_contract()
        log.info("model %s on %s, providers %s", self.model_path.name, self.device, self.providers)

    def _providers(self, gpu: GpuSettings) -> list:
        """The provider list for this artifact; cache folders are created here (a temporary folder,
        with a warning, where the configured one cannot be written: engines are then rebuilt at
        every start)."""
        import onnxruntime as ort

        from serving.artifact import read_metadata

        if not gpu.tensorrt:
            return execution_providers("cuda", gpu, device_id=self.device_id, input_name=INPUT_NAME, input_size=0,
                                       model_sha256="", ort_version=ort.__version__)
        # TensorRT's profile needs the input size before the session opens: one metadata read
        input_size = read_metadata(self.model_path).input_size

        def build(settings: GpuSettings) -> list:
            return execution_providers("cuda", settings, device_id=self.device_id, input_name=INPUT_NAME,
                                       input_size=input_size, model_sha256=self.sha256, ort_version=ort.__version__)

        providers = build(gpu)
        try:
            for folder in cache_folders(providers):
                folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            fallback = os.path.join(tempfile.gettempdir(), "onnxship-trt-cache")
            log.warning("TensorRT cache folder %s is not writable (%s): using %s, where engines may not "
                        "survive a restart; set --trt-cache-dir / ONNXSHIP_TRT_CACHE_DIR to a writable, persistent folder",
                        gpu.trt_cache_dir, error.strerror or error, fallback)
            providers = build(replace(gpu, trt_cache_dir=fallback))
            for folder in cache_folders(providers):
                folder.mkdir(parents=True, exist_ok=True)
        return providers

    def _check_contract(self) -> None:
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = {o.name for o in self.session.get_outputs()}
        if INPUT_NAME not in inputs or PROBABILITIES_NAME not in outputs:
            raise DeviceError(
                f"{self.model_path}: expected input {INPUT_NAME!r} and output {PROBABILITIES_NAME!r}, "
                f"found inputs {sorted(inputs)} and outputs {sorted(outputs)}"
            )

    @cached_property
    def sha256(self) -> str:
        return file_sha256(self.model_path)

    @property
    def labels(self) -> tuple[str, ...]:
        return self.metadata.labels

    def load_input(self, source: bytes | str | Path) -> np.ndarray:
        """Decode an image (bytes or path) to the artifact's (size, size, 3) uint8 input."""
        return load_image(source, self.metadata.input_size, self.metadata.resize_policy, max_pixels=self.max_pixels)

    def _as_batch(self, images: np.ndarray) -> np.ndarray:
        batch = np.asarray(images)
        if batch.ndim == 3:
            batch = batch[None]
        if batch.dtype != np.uint8 or batch.ndim != 4 or batch.shape[-1] != 3:
            raise ValueError(f"expected uint8 [N, H, W, 3] images, got {batch.dtype} {list(batch.shape)}")
        return np.ascontiguousarray(batch)

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Probabilities [N, classes] for uint8 NHWC images (one HWC image is treated as N=1)."""
        return self._run(self._as_batch(images), [PROBABILITIES_NAME])[0]

    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(logits, probabilities) for uint8 NHWC images."""
        logits, probabilities = self._run(self._as_batch(images), [LOGITS_NAME, PROBABILITIES_NAME])
        return logits, probabilities

    def _run(self, batch: np.ndarray, outputs: list[str]) -> list[np.ndarray]:
        if self.max_batch and batch.shape[0] > self.max_batch:
            pieces = [self._run(batch[i:i + self.max_batch], outputs) for i in range(0, batch.shape[0], self.max_batch)]
            return [np.concatenate(parts) for parts in zip(*pieces)]
        if self.device == "cuda":
            return self._run_bound(batch, outputs)
        if self.spinning_session is not None and cores_to_spare(self.cores) >= self.intra_op_threads:
            return self.spinning_session.run(outputs, {INPUT_NAME: batch})
        return self.session.run(outputs, {INPUT_NAME: batch})

    def _run_bound(self, batch: np.ndarray, outputs: list[str]) -> list[np.ndarray]:
        binding = self.session.io_binding()
        binding.bind_cpu_input(INPUT_NAME, batch)  # uint8: 4x fewer bytes over PCIe than float32
        for name in outputs:
            binding.bind_output(name, "cuda", self.device_id)
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()

    def top_k(self, probabilities_row: np.ndarray, k: int) -> list[tuple[int, float]]:
        return top_k(probabilities_row, k)

    def describe(self) -> dict:
        return {
            "device": self.device,
            "requested_device": self.requested_device,
            "providers": self.providers,
            "intra_op_threads": self.intra_op_threads,
            "spinning": self.spinning,
            **({"tensorrt_cache": self.trt_cache} if self.trt_cache is not None else {}),
        }


def count_engines(folder: str) -> int:
    try:
        return sum(1 for p in Path(folder).iterdir() if p.suffix == ".engine")
    except OSError:
        return 0


def trt_cache_state(providers: list) -> dict:
    """The TensorRT engine folder and how many engines it held before the session opened (0: the
    engines are built now, a cold start; more: they are loaded from the cache)."""
    options = dict(providers[0][1])
    folder = options["trt_engine_cache_path"]
    return {"engine_dir": folder, "timing_dir": options["trt_timing_cache_path"], "fp16": options["trt_fp16_enable"] == "1",
            "engines_before": count_engines(folder)}
