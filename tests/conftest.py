"""Shared fixtures: the repository's reference data and one exported default artifact per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

REPO_ROOT = Path(__file__).resolve().parents[1]
IMAGES_DIR = REPO_ROOT / "data" / "images"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def images_dir() -> Path:
    return IMAGES_DIR


@pytest.fixture(scope="session")
def default_artifact(tmp_path_factory) -> Path:
    """The bundled default model exported once per test session (EfficientNet-Lite0)."""
    from flows.stages.export import export_onnx
    from flows.model.zoo import DEFAULT_ARCH, load_model
    from flows.stages.simplify import simplify_onnx

    target = tmp_path_factory.mktemp("artifact") / "model.onnx"
    export_onnx(load_model(DEFAULT_ARCH), target)
    result = simplify_onnx(target)
    assert result.simplified, f"onnxsim failed on the default model: {result.error}"
    return target


@pytest.fixture(scope="session")
def prefect_harness():
    """The one Prefect test harness of the session (a temporary API + database, ~15 s)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
