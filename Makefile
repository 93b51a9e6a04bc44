# onnxship: the two commands a new user needs are `make release` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

export PREFECT_SERVER_ANALYTICS_ENABLED ?= false

.PHONY: install test release

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

release: install
	$(PY) -m flows.release
