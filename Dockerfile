# onnxship GPU serving image: the LitServe server (serving/) and one ONNX artifact, nothing else
# (no torch, Prefect or MLflow). Built by Cerebrium from a bundle staged by flows/cerebrium.py,
# which fills in the ARG defaults below (Cerebrium passes no --build-arg); a plain
# `docker build --build-arg MODEL_SHA256=$(sha256sum models/model.onnx | cut -c1-64) .` works too.
#
# Base: python slim + onnxruntime-gpu with NVIDIA's CUDA/cuDNN pip wheels instead of an
# nvidia/cuda image: one pinned requirements file decides every CUDA library version, matched to
# the onnxruntime-gpu build, and nothing unused (compilers, CUDA samples) ships. Expected size
# about 3.5 GB unpacked, 2.1 GB compressed (cuDNN + cuBLAS are ~80% of it); see
# README.md, "Deploy to Cerebrium".

ARG PYTHON_VERSION=3.11
FROM python:${PYTHON_VERSION}-slim-bookworm

ARG PYTHON_VERSION=3.11
# CUDA line: 12 -> requirements/serving-gpu.txt (onnxruntime-gpu 1.26.0, the last CUDA 12 build);
#            13 -> requirements/serving-gpu-cu13.txt (onnxruntime-gpu >= 1.27, NVIDIA driver >= 580).
ARG CUDA_MAJOR=12

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

WORKDIR /app

COPY requirements/serving-gpu*.txt /tmp/requirements/
RUN if [ "${CUDA_MAJOR}" = "13" ]; then req=serving-gpu-cu13.txt; else req=serving-gpu.txt; fi \
    && pip install --no-cache-dir -r "/tmp/requirements/${req}" \
    && rm -rf /tmp/requirements \
    && python -c "import onnxruntime as ort; assert 'CUDAExecutionProvider' in ort.get_available_providers(), ort.get_available_providers()"

# The pip CUDA/cuDNN libraries live under site-packages/nvidia/*/lib; onnxruntime's CUDA provider
# dlopens them by name, so they go on the loader path (the same effect as onnxruntime.preload_dlls()).
ENV LD_LIBRARY_PATH=/usr/local/lib/python${PYTHON_VERSION}/site-packages/nvidia/cudnn/lib:/usr/local/lib/python${PYTHON_VERSION}/site-packages/nvidia/cublas/lib:/usr/local/lib/python${PYTHON_VERSION}/site-packages/nvidia/cufft/lib:/usr/local/lib/python${PYTHON_VERSION}/site-packages/nvidia/curand/lib:/usr/local/lib/python${PYTHON_VERSION}/site-packages/nvidia/cuda_runtime/lib:/usr/local/lib/python${PYTHON_VERSION}/site-packages/nvidia/cuda_nvrtc/lib:/usr/local/lib/python${PYTHON_VERSION}/site-packages/nvidia/nvjitlink/lib:/usr/local/lib/python${PYTHON_VERSION}/site-packages/nvidia/cu13/lib

RUN useradd --create-home --uid 10001 --user-group --shell /usr/sbin/nologin onnxship

# Code and model belong to root and are read-only for the server user.
COPY serving/ /app/serving/
COPY models/model.onnx /app/models/model.onnx

# Declared after the dependency layers: a new model or batching setting must not invalidate the
# cached pip install (every RUN after an ARG sees it, so a changed value would be a cache miss).
# sha256 of models/model.onnx: the server refuses to start when the baked file differs.
ARG MODEL_SHA256=
# Server tuning (release parameters cerebrium.workers / max_batch_size / ...; a bundle pins them). Empty means
# the server's own GPU defaults (serving/config.py GPU_DEFAULTS).
ARG WORKERS=
ARG MAX_BATCH_SIZE=
ARG BATCH_TIMEOUT=
ARG MODEL_NAME=
ARG MODEL_VERSION=

# TensorRT engines (with ONNXSHIP_TENSORRT=1 and the TensorRT libraries) are cached on Cerebrium's
# persistent volume, so only the first replica of a model version builds them; where that path
# cannot be written the server warns and uses a temporary folder.
# Everything the server reads comes from the environment (python -m serving: flag > env > default);
# `docker run -e ONNXSHIP_DEVICE=cpu ...` runs the same image without a GPU. API_KEY is NOT baked
# in: set it as a secret in the Cerebrium dashboard (secrets arrive as environment variables).
ENV ONNXSHIP_MODEL=models/model.onnx \
    MODEL_SHA256=${MODEL_SHA256} \
    ONNXSHIP_HOST=0.0.0.0 \
    ONNXSHIP_PORT=8192 \
    ONNXSHIP_DEVICE=cuda \
    ONNXSHIP_WORKERS=${WORKERS} \
    ONNXSHIP_MAX_BATCH_SIZE=${MAX_BATCH_SIZE} \
    ONNXSHIP_BATCH_TIMEOUT=${BATCH_TIMEOUT} \
    ONNXSHIP_MODEL_NAME=${MODEL_NAME} \
    ONNXSHIP_MODEL_VERSION=${MODEL_VERSION} \
    ONNXSHIP_TRT_CACHE_DIR=/persistent-storage/onnxship/tensorrt

USER 10001:10001
EXPOSE 8192

# Liveness only (readiness is GET /ready, probed by Cerebrium via cerebrium.toml).
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('ONNXSHIP_PORT', '8192'), timeout=4)"]

# Python as PID 1 gets no default SIGTERM action; the server shuts down gracefully on SIGINT.
STOPSIGNAL SIGINT
CMD ["python", "-m", "serving"]
