"""Shared fixtures: the repository's reference data and one exported default artifact per session."""

from __future__ import annotations

import os
import shutil
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
    # TEMPORARY until flows.export lands: FOUNDATION replaces this body with the real export.
    target = tmp_path_factory.mktemp("artifact") / "model.onnx"
    shutil.copy("/work/dev/effnet.onnx", target)
    return target
