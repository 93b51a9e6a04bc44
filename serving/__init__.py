"""onnxship's server side: what ships in the GPU image (no torch, no Prefect, no MLflow)."""

__version__ = "0.1.0"
