# onnxship pipeline image: what a Docker or Kubernetes work pool (team/work-pools/) runs a release,
# smoke test or rollback in. The project lives in /opt/onnxship (prefect.yaml's pull step moves
# there: `python -m team pool docker` deploys with that working directory); CPU torch, no GPU.
# Build from the repository root (BuildKit reads team/worker.Dockerfile.dockerignore instead of
# the root .dockerignore, which keeps the serving image's context small):
#   DOCKER_BUILDKIT=1 docker build -f team/worker.Dockerfile -t onnxship-pipeline:latest .
# torch==2.13.0 from PyPI is a multi-GB CUDA build on Linux x86_64: pass the CPU wheel index as
#   --build-arg TORCH_INDEX_URL=...   (the index README.md names in "Two commands").

ARG PYTHON_VERSION=3.11
FROM python:${PYTHON_VERSION}-slim-bookworm

ARG TORCH_INDEX_URL=
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false

WORKDIR /opt/onnxship

# Dependencies first (cached until a requirements file changes), every version from constraints.txt.
COPY requirements/ requirements/
RUN if [ -n "${TORCH_INDEX_URL}" ]; then set -- --extra-index-url "${TORCH_INDEX_URL}"; fi \
    && pip install --no-cache-dir "$@" -c requirements/constraints.txt \
        -r requirements/serving.txt -r requirements/pipeline.txt

COPY pyproject.toml README.md prefect.yaml ./
COPY flows/ flows/
COPY serving/ serving/
COPY scripts/ scripts/
COPY data/ data/
RUN pip install --no-cache-dir --no-deps . \
    && useradd --create-home --uid 10001 --user-group --shell /usr/sbin/nologin onnxship \
    && mkdir -p models .onnxship \
    && chown onnxship:onnxship models .onnxship

# MLFLOW_TRACKING_URI and PREFECT_API_URL come from the work pool (its env, the worker's settings).
USER 10001:10001
CMD ["python", "-m", "flows.release", "--help"]
