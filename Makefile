# onnxship: the two commands a new user needs are `make release` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

export PREFECT_SERVER_ANALYTICS_ENABLED ?= false

.PHONY: install test test-services release convert openapi serve bench cerebrium-bundle rollback stop-server api-key prefect-server prefect-deploy prefect-worker prefect-run
.PHONY: team-up team-down team-status team-env team-import team-pool

install: $(STAMP)

# One environment for development: server + pipeline + test tools, every version pinned by
# requirements/constraints.txt so a fresh clone resolves the same set.
$(STAMP): pyproject.toml requirements/*.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c requirements/constraints.txt -e '.[pipeline,dev]'
	touch $(STAMP)

test: install test-services
	$(PY) -m pytest

# Team mode's integration test (tests/team/) runs a real PostgreSQL: Debian's server binaries, installed
# with apt when missing and this user may (root, or sudo without a password).
test-services:
	@if ! compgen -G "/usr/lib/postgresql/*/bin/postgres" >/dev/null; then \
	  if [ "$$(id -u)" = 0 ]; then sudo=; elif sudo -n true 2>/dev/null; then sudo="sudo -n"; else \
	    echo "note: PostgreSQL is not installed and apt needs root: tests/team/ will be skipped (apt-get install postgresql)"; exit 0; fi; \
	  echo "installing PostgreSQL (apt-get) for tests/team/"; \
	  $$sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq postgresql >/dev/null; \
	fi

# The seed's converter with its defaults: models/model.onnx from the bundled EfficientNet-Lite0.
convert: install
	$(PY) scripts/convert_to_onnx.py --output models/model.onnx --test-image data/images/coffee.png $(ARGS)

# docs/openapi.json: the OpenAPI document a default server of the bundled model serves (checked by
# tests/serving/test_openapi.py); exports the bundled model first when models/model.onnx is missing.
openapi: install
	@test -f models/model.onnx || $(MAKE) --no-print-directory convert
	$(PY) -m serving --print-openapi --model models/model.onnx > docs/openapi.json.tmp
	mv docs/openapi.json.tmp docs/openapi.json

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
	$(PY) -m flows.deploy.local stop

# Print the local server's API key (never printed by the release): API_KEY=$$(make -s api-key)
api-key:
	@$(PY) -m flows.deploy.local key

# The Prefect cycle (prefect.yaml): a server, the deployments, a worker, a run.
PREFECT := $(VENV)/bin/prefect
PREFECT_PORT ?= 4200
API_URL_ORIGIN := $(origin PREFECT_API_URL)
prefect-%: export PREFECT_API_URL ?= http://127.0.0.1:$(PREFECT_PORT)/api
# Deployments, workers and runs need the server: say so at once instead of a 20 s hang and a traceback.
define require_prefect_server
	@if [ "$(API_URL_ORIGIN)" = undefined ]; then echo "note: PREFECT_API_URL is not set in your shell; make uses $$PREFECT_API_URL (plain 'prefect' commands need: export PREFECT_API_URL=$$PREFECT_API_URL)"; fi
	@$(PY) -c 'import sys, urllib.request as u; u.urlopen(sys.argv[1] + "/health", timeout=5)' "$$PREFECT_API_URL" 2>/dev/null \
	  || { echo "error: no Prefect server answers at $$PREFECT_API_URL: start it with 'make prefect-server' (and a worker: 'make prefect-worker')" >&2; exit 2; }
endef

prefect-server: install
	$(PREFECT) server start --host 127.0.0.1 --port $(PREFECT_PORT)

prefect-deploy: install
	$(require_prefect_server)
	$(PREFECT) work-pool inspect onnxship >/dev/null 2>&1 || $(PREFECT) work-pool create onnxship --type process
	PWD=$(CURDIR) $(PREFECT) deploy --all --no-prompt

prefect-worker: install
	$(require_prefect_server)
	$(PREFECT) worker start --pool onnxship

# The same flags as `make release` (ARGS="--gate.min-accuracy 1 ..."), queued on the server for a worker.
prefect-run: install
	$(require_prefect_server)
	$(PY) -m flows.submit 'release/$(or $(TARGET),local)' $(if $(TARGET),--target $(TARGET)) $(ARGS)

# Stage (and preflight) the Cerebrium bundle of ARTIFACT without deploying it.
cerebrium-bundle: install
	$(PY) -m flows.deploy.cerebrium preflight $(or $(ARTIFACT),models/model.onnx)

# Team mode (README "Team mode"): PostgreSQL + MLflow tracking server + Prefect server on this
# machine, data under .onnxship/team/ (TEAM_DIR); ports TEAM_PG_PORT/TEAM_MLFLOW_PORT/TEAM_PREFECT_PORT.
team-up: install
	$(PY) -m team up

team-down:
	$(PY) -m team down

team-status:
	$(PY) -m team status

# eval "$$(make -s team-env)" exports MLFLOW_TRACKING_URI and PREFECT_API_URL
team-env:
	@$(PY) -m team env

# Copy the local registry history (mlruns/) into the team MLflow server (FROM=sqlite:///..., MODEL_NAME=...).
team-import: install
	$(PY) -m team import-local $(if $(FROM),--from $(FROM)) $(if $(MODEL_NAME),--model-name $(MODEL_NAME))

# A Docker or Kubernetes work pool from team/work-pools/ (KIND=docker|kubernetes), prefect.yaml's deployments on it.
team-pool: install
	$(PY) -m team pool $(or $(KIND),docker)
