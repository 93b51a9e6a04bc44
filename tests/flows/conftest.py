"""Release-area fixtures (the session's Prefect harness `prefect_harness` is in tests/conftest.py):
real MLflow sqlite stores in tmp dirs, free ports, real local servers stopped by PID, and a
deliberately broken candidate."""

from __future__ import annotations

from pathlib import Path

import pytest
from support import free_port

from flows.deploy.local import read_state, stop_server
from flows.params import ReleaseParams


@pytest.fixture
def tracking_uri(tmp_path) -> str:
    return f"sqlite:///{tmp_path}/mlruns/mlflow.db"


@pytest.fixture
def state_dir(tmp_path):
    """Where a test's local server records itself; the server is stopped by PID afterwards."""
    directory = tmp_path / "state"
    yield directory
    if read_state(directory):
        stop_server(directory)


def fast_params(tmp_path: Path, tracking_uri: str, state_dir: Path, **overrides) -> ReleaseParams:
    """A release with tiny benchmarks, its own store, port, state and output dirs."""
    data = {
        "tracking_uri": tracking_uri,
        "state_dir": str(state_dir),
        "output_dir": str(tmp_path / "models"),
        "server": {"port": free_port(), "workers": 1},
        "benchmark": {"batch_sizes": [1, 2], "duration_s": 0.05, "warmup_calls": 1, "include_torch": True},
        # tests share 2 cores with other jobs: a 0.05 s latency sample is noise, neither a regression
        # nor a p95 (one stall among 5 calls is the p95); both latency rules are tested in test_gate.py
        # with fixed figures
        "gate": {"max_latency_regression_pct": 1000, "max_p95_latency_ms": 60000},
    }
    data.update(overrides)
    return ReleaseParams.model_validate(data)


@pytest.fixture(scope="session")
def broken_weights(tmp_path_factory) -> Path:
    """EfficientNet-Lite0 weights with the classifier perturbed: exports and passes parity (PyTorch
    and ONNX agree), but predicts other classes, so the gate must reject it."""
    import torch

    from flows.model.zoo import load_model

    loaded = load_model("efficientnet_lite0")
    state = {k: v.clone() for k, v in loaded.module.state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    state["_fc.weight"] += 0.5 * torch.randn(state["_fc.weight"].shape, generator=generator)
    path = tmp_path_factory.mktemp("broken") / "broken_lite0.pth"
    torch.save(state, path)
    return path


@pytest.fixture(scope="session")
def broken_artifact(default_artifact, tmp_path_factory) -> Path:
    """The default artifact with its classifier weights perturbed in the ONNX graph itself."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(default_artifact))
    classifier = max(
        (init for init in model.graph.initializer if len(init.dims) == 2 and 1000 in init.dims),
        key=lambda init: int(np.prod(init.dims)),
    )
    weights = numpy_helper.to_array(classifier)
    noisy = weights + np.random.default_rng(0).normal(0, 0.5, weights.shape).astype(weights.dtype)
    classifier.CopyFrom(numpy_helper.from_array(noisy, classifier.name))
    path = tmp_path_factory.mktemp("broken-onnx") / "model.onnx"
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="session", name="free_port")
def free_port_fixture():
    """A function returning a free TCP port on 127.0.0.1 (never 8192)."""
    return free_port


@pytest.fixture(scope="session", name="fast_params")
def fast_params_fixture():
    return fast_params
