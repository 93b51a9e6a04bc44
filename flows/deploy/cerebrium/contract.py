"""The serving image contract: what the Dockerfile, cerebrium.toml, the bundle and the server must
agree on. Preflight (flows/deploy/cerebrium/preflight.py) checks every line of it before an upload."""

from __future__ import annotations

from serving.config import DEFAULT_PORT

SERVER_PORT = DEFAULT_PORT
HEALTH_PATH = "/health"  # liveness: the platform restarts the replica when it fails
READY_PATH = "/ready"  # readiness: 503 until the model is loaded (and on CUDA when asked for)
MODEL_PATH_IN_BUNDLE = "models/model.onnx"
PERSISTENT_STORAGE = "/persistent-storage"  # Cerebrium mounts the app's persistent volume here
TRT_CACHE_DIR = f"{PERSISTENT_STORAGE}/onnxship/tensorrt"  # the image's ONNXSHIP_TRT_CACHE_DIR
DOCKERFILE = "Dockerfile"
DOCKERIGNORE = ".dockerignore"
TOML_NAME = "cerebrium.toml"
MANIFEST_NAME = "bundle.json"  # ours, never uploaded (not in the include list)
GPU_REQUIREMENTS = ("requirements/serving-gpu.txt", "requirements/serving-gpu-cu13.txt")
UPLOAD_LIMIT_BYTES = 2 * 1024**3  # the CLI's upload fails above 2 GB
DEV_FOLDERS = (".git", ".venv", "venv", "node_modules", "mlruns")  # never uploaded

# onnxruntime-gpu >= 1.27 is built for CUDA 13 (driver >= 580); 1.26.0 is the last CUDA 12 build.
CUDA_LINES: dict[str, dict[str, str]] = {
    "12": {"onnxruntime_gpu": "1.26.0", "requirements": "requirements/serving-gpu.txt", "min_driver": "525"},
    "13": {"onnxruntime_gpu": "1.31.1", "requirements": "requirements/serving-gpu-cu13.txt", "min_driver": "580"},
}

# What `cerebrium deploy` uploads from the bundle (doublestar globs, as the Go CLI matches them).
INCLUDE = [DOCKERFILE, "serving/**/*.py", "requirements/serving-gpu*.txt", MODEL_PATH_IN_BUNDLE]
EXCLUDE = [".*", "**/.*", "**/__pycache__/**", "**/*.pyc"]


class CerebriumError(RuntimeError):
    """One step of the Cerebrium deploy failed; `step` names it, the message says why and what to do."""

    def __init__(self, step: str, message: str):
        super().__init__(f"cerebrium {step}: {message}")
        self.step = step
