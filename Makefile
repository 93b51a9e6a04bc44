# onnxship: the two commands a new user needs are `make release` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

export PREFECT_SERVER_ANALYTICS_ENABLED ?= false

.PHONY: install test release convert serve bench cerebrium-bundle rollback stop-server prefect-server prefect-deploy prefect-worker prefect-run

install: $(STAMP)

# One environment for development: server + pipeline + test tools, every version pinned by
# requirements/constraints.txt so a fresh clone resolves the same set.
$(STAMP): pyproject.toml requirements/*.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c requirements/constraints.txt -e '.[pipeline,dev]'
	touch $(STAMP)

test: install
	$(PY) -m pytest

# The seed's converter with its defaults: models/model.onnx from the bundled EfficientNet-Lite0.
convert: install
	$(PY) scripts/convert_to_onnx.py --output models/model.onnx --test-image data/images/coffee.png $(ARGS)

# Serve an artifact (or MODEL=models:/onnxship-classifier@champion) on :8192; needs API_KEY.
serve: install
	$(PY) -m serving --model $(or $(MODEL),models/model.onnx) $(ARGS)

# In-process ceiling vs this server vs a seed-like baseline, side by side (benchmarks/bench.py).
bench: install
	$(PY) -m benchmarks.bench --model $(or $(MODEL),models/model.onnx) $(ARGS)

# make release TARGET=cerebrium deploys to Cerebrium (README.md, "Deploy to Cerebrium").
release: install
	$(PY) -m flows.release $(if $(TARGET),--target $(TARGET)) $(if $(PORT),--port $(PORT)) $(ARGS)

# @previous becomes @champion again (run twice to undo); restarts the local server on it.
rollback: install
	$(PY) -m flows.rollback

# Stop the local server that `make release` started (by the PID in .onnxship/local-server.json).
stop-server:
	$(PY) -m flows.local stop

# The Prefect cycle (prefect.yaml): a server, the deployments, a worker, a run.
PREFECT := $(VENV)/bin/prefect
PREFECT_PORT ?= 4200
prefect-%: export PREFECT_API_URL ?= http://127.0.0.1:$(PREFECT_PORT)/api

prefect-server: install
	$(PREFECT) server start --host 127.0.0.1 --port $(PREFECT_PORT)

prefect-deploy: install
	$(PREFECT) work-pool inspect onnxship >/dev/null 2>&1 || $(PREFECT) work-pool create onnxship --type process
	PWD=$(CURDIR) $(PREFECT) deploy --all --no-prompt

prefect-worker: install
	$(PREFECT) worker start --pool onnxship

prefect-run: install
	$(PREFECT) deployment run 'release/$(or $(TARGET),local)' $(if $(PARAMS),--params '$(PARAMS)')

# Stage (and preflight) the Cerebrium bundle of ARTIFACT without deploying it.
cerebrium-bundle: install
	$(PY) -m flows.cerebrium preflight $(or $(ARTIFACT),models/model.onnx)
