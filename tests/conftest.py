"""Shared fixtures: the repository's reference data and one exported default artifact per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

REPO_ROOT = Path(__file__).resolve().parents[1]
IMAGES_DIR = REPO_ROOT / "data" / "images"
# never in the repository; ../shared beside the checkout (CI), or ONNXSHIP_SHARED_DIR (a git worktree elsewhere)
SHARED_DIR = Path(os.environ.get("ONNXSHIP_SHARED_DIR") or REPO_ROOT.parent / "shared")
DEV_IMAGES = SHARED_DIR / "data" / "imagenet-sample-dev"


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


@pytest.fixture(scope="session")
def dev_images() -> Path:
    """101 labelled ImageNet photos outside the repository (CI has ../shared)."""
    if not (DEV_IMAGES / "manifest.csv").is_file():
        pytest.skip(f"{DEV_IMAGES} is absent: the variant tests need real labelled photos (CI has ../shared)")
    return DEV_IMAGES


@pytest.fixture(scope="session")
def default_model():
    from flows.model.zoo import DEFAULT_ARCH, load_model

    return load_model(DEFAULT_ARCH)


def linked_folder(folder: Path, rows: list[dict], source: Path, manifest: bool) -> Path:
    folder.mkdir(parents=True)
    for row in rows:
        (folder / row["file"]).symlink_to(source / row["file"])
    if manifest:
        lines = ["file,class_index"] + [f"{row['file']},{row['class_index']}" for row in rows]
        (folder / "manifest.csv").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="session")
def variant_set(default_artifact, default_model, dev_images, tmp_path_factory):
    """fp32, int8 and fp16 of the default artifact, built and judged by the release's variants stage
    with its default budget: 50 labelled evaluation photos, 16 other photos to calibrate int8."""
    import csv

    from flows.params import ReleaseParams
    from flows.reference import load_references
    from flows.stages.evaluate import prepare_variants
    from serving.runtime import Classifier

    with (dev_images / "manifest.csv").open(newline="") as stream:
        rows = sorted(csv.DictReader(stream), key=lambda row: row["file"])
    root = tmp_path_factory.mktemp("variants")
    params = ReleaseParams(
        variants=("fp32", "int8", "fp16"), server={"device": "cpu"},
        eval_images=linked_folder(root / "eval", rows[:50], dev_images, manifest=True),
        calibration_images=linked_folder(root / "calibration", rows[50:66], dev_images, manifest=False),
    )
    fp32 = Classifier(default_artifact, device="cpu")
    return prepare_variants(params, default_model, fp32, default_artifact, load_references(), root, say=lambda _: None)
