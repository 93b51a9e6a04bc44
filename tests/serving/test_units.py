"""In-process parts of serving/: configuration, auth headers, runtime, model URIs, batching loop."""

from __future__ import annotations

import subprocess
import sys
import time
from queue import Queue

import numpy as np
import pytest
from support import stop_process_group

from serving.config import ConfigError, ServerConfig, cpu_threads_per_worker, load_config
from serving.model_uri import DEFAULT_TRACKING_URI, ModelUriError, parse_models_uri, resolve_model
from serving.runtime import Classifier, DeviceError, cuda_available, resolve_device, top_k


# ---------------------------------------------------------------- configuration


def test_flags_beat_environment_beat_defaults():
    env = {"API_KEY": "k", "ONNXSHIP_MODEL": "env.onnx", "ONNXSHIP_PORT": "9000", "ONNXSHIP_WORKERS": "3",
           "MODEL_SHA256": "a" * 64, "ONNXSHIP_BATCH_TIMEOUT": ""}
    config = load_config(["--port", "9100"], environ=env)
    assert (config.model, config.port, config.workers, config.expected_sha256) == ("env.onnx", 9100, 3, "a" * 64)
    assert config.batch_timeout is None and config.host == "0.0.0.0"
    assert "api_key" not in config.public() and "'k'" not in repr(config)
    assert load_config(["--model", "m.onnx", "--no-auth"], environ={}).no_auth is True
    assert ServerConfig().port == 8192


@pytest.mark.parametrize("argv, env, words", [
    (["--model", "m.onnx"], {}, "API_KEY"),
    ([], {"API_KEY": "k"}, "no model"),
    (["--model", "m.onnx", "--workers", "0"], {"API_KEY": "k"}, "--workers"),
    (["--model", "m.onnx", "--expected-sha256", "abc"], {"API_KEY": "k"}, "64 hex"),
    (["--model", "m.onnx"], {"API_KEY": "k", "ONNXSHIP_PORT": "eighty"}, "ONNXSHIP_PORT"),
])
def test_invalid_configuration_names_the_setting(argv, env, words):
    with pytest.raises(ConfigError, match=words):
        load_config(argv, environ=env)


def test_resolved_defaults_split_cores_between_workers():
    config = ServerConfig(model="m", no_auth=True).resolved("cpu")
    assert config.workers >= 1 and config.intra_op_threads >= 1 and config.api_servers == config.workers
    # two threads per worker's share of the cores, never more than the machine has
    assert [cpu_threads_per_worker(cores, workers) for cores, workers in [(2, 2), (2, 1), (16, 16), (16, 4), (1, 1)]] \
        == [2, 2, 2, 8, 1]
    assert ServerConfig(model="m", no_auth=True, intra_op_threads=1).resolved("cpu").intra_op_threads == 1
    gpu = ServerConfig(model="m", no_auth=True).resolved("cuda")
    assert (gpu.workers, gpu.max_batch_size) == (1, 32)


# ---------------------------------------------------------------- runtime


def test_classifier_predicts_and_reports_providers(default_artifact, images_dir):
    classifier = Classifier(default_artifact, device="cpu", intra_op_threads=1)
    assert classifier.providers == ["CPUExecutionProvider"] and classifier.device == "cpu"
    image = classifier.load_input(images_dir / "coffee.png")
    size = classifier.metadata.input_size
    assert image.shape == (size, size, 3) and image.dtype == np.uint8
    batch = np.stack([image, image])
    probabilities = classifier.predict(batch)
    assert probabilities.shape == (2, classifier.metadata.num_classes)
    assert np.allclose(probabilities.sum(axis=1), 1, atol=1e-4)
    logits, again = classifier.run(image)
    assert logits.shape == (1, classifier.metadata.num_classes) and np.allclose(again[0], probabilities[0], atol=1e-6)
    assert len(classifier.sha256) == 64
    with pytest.raises(ValueError, match="uint8"):
        classifier.predict(batch.astype(np.float32))


def test_top_k_orders_by_confidence():
    row = np.array([0.1, 0.5, 0.05, 0.3, 0.05])
    assert top_k(row, 3) == [(1, 0.5), (3, 0.3), (0, 0.1)]
    assert len(top_k(row, 99)) == 5


def test_device_selection_without_gpu():
    assert resolve_device("cpu") == "cpu"
    with pytest.raises(DeviceError, match="unknown device"):
        resolve_device("tpu")
    if cuda_available():
        pytest.skip("GPU present")
    assert resolve_device("auto") == "cpu"
    with pytest.raises(DeviceError, match="--device cuda"):
        resolve_device("cuda")


# ---------------------------------------------------------------- model URIs


def test_model_uri_parsing_and_local_paths(default_artifact, tmp_path):
    assert DEFAULT_TRACKING_URI == "sqlite:///mlruns/mlflow.db"
    assert parse_models_uri("models:/onnxship@champion") == ("onnxship", "champion", None)
    assert parse_models_uri("models:/onnxship/3") == ("onnxship", None, "3")
    with pytest.raises(ModelUriError, match="expected models:/"):
        parse_models_uri("models:/onnxship")
    assert resolve_model(default_artifact).path == default_artifact.resolve()
    with pytest.raises(ModelUriError, match="no such model file"):
        resolve_model(tmp_path / "missing.onnx")


# ---------------------------------------------------------------- batching loop


def test_greedy_batch_loop_counts_images_not_requests():
    from types import SimpleNamespace

    from serving.api import InferenceRequest
    from serving.batching import GreedyBatchLoop

    queue = Queue()
    for index, count in enumerate((3, 3, 3)):
        queue.put((0, f"uid{index}", time.monotonic(), InferenceRequest(np.zeros((count, 2, 2, 3), np.uint8))))
    api = SimpleNamespace(max_batch_size=5, batch_timeout=0.0, request_timeout=30)
    payloads, timed_out = GreedyBatchLoop().get_batch_requests(api, queue, transport=None)
    assert len(payloads) == 2 and not timed_out  # 3 + 3 images reach the limit of 5
    assert queue.qsize() == 1
    queue.put((0, "stale", time.monotonic() - 60, InferenceRequest(np.zeros((1, 2, 2, 3), np.uint8))))
    payloads, timed_out = GreedyBatchLoop().get_batch_requests(api, queue, transport=None)
    assert [uid for _, uid, _ in payloads] == ["uid2"] and timed_out == [(0, "stale")]


# ---------------------------------------------------------------- readiness while workers load


def test_ready_is_503_until_every_worker_is_ready(default_artifact, tmp_path):
    """The /ready route of the real app, with LitServe's worker status in each state."""
    from fastapi.testclient import TestClient
    from litserve.utils import WorkerSetupStatus

    from serving.artifact import file_sha256, read_metadata
    from serving.server import ModelInfo, build_server

    config = ServerConfig(model=str(default_artifact), no_auth=True).resolved("cpu")
    info = ModelInfo(config, default_artifact, read_metadata(default_artifact), file_sha256(default_artifact), "cpu",
                     tmp_path)
    server = build_server(config, info)
    client = TestClient(server.app)
    assert client.get("/health").json() == {"status": "ok"}
    server.workers_setup_status = {}
    assert client.get("/ready").status_code == 503
    server.workers_setup_status = {"predict_0": WorkerSetupStatus.READY, "predict_1": WorkerSetupStatus.STARTING}
    response = client.get("/ready")
    assert response.status_code == 503 and response.json()["workers"]["predict_1"] == "starting"
    server.workers_setup_status["predict_1"] = WorkerSetupStatus.READY
    assert client.get("/ready").status_code == 200
    routes = {(route.path, tuple(sorted(getattr(route, "methods", ())))) for route in server.app.router.routes}
    assert ("/info", ("GET",)) not in routes and ("/", ("GET",)) not in routes


# ---------------------------------------------------------------- metrics


FIRST_USE_RACE = """
import threading
from serving.metrics import metrics, prepare_multiprocess_dir
prepare_multiprocess_dir()
barrier, seen, errors = threading.Barrier(16), [], []
def first_use():
    barrier.wait()
    try:
        seen.append(id(metrics()))
    except Exception as error:
        errors.append(repr(error))
threads = [threading.Thread(target=first_use) for _ in range(16)]
[t.start() for t in threads]
[t.join() for t in threads]
print(len(set(seen)), len(seen), errors)
"""


def test_metrics_first_used_by_many_threads_at_once_are_created_once():
    # an HTTP process's first requests reach metrics() from the event loop and decoding threads at
    # once; creating the metrics twice registered every series twice and failed those requests
    result = subprocess.run([sys.executable, "-c", FIRST_USE_RACE], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "1 16 []", result.stdout  # one Metrics object, 16 callers, no error


# ---------------------------------------------------------------- shutdown


SIGNAL_TO_ANOTHER_THREAD = """
import multiprocessing, signal, sys, threading, time
from serving.server import PollingShutdownEvent
if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with SIGINT ignored
    event = multiprocessing.Manager().Event()
    if sys.argv[1] == "polling":
        event = PollingShutdownEvent(event)
    # the kernel may hand a process-directed SIGINT to any thread; here it goes to a timer thread
    threading.Timer(0.3, lambda: signal.pthread_kill(threading.get_ident(), signal.SIGINT)).start()
    print("waiting", flush=True)
    try:
        event.wait()
    except KeyboardInterrupt:
        print("interrupted")
"""


@pytest.mark.parametrize("kind", ["polling", "plain"])
def test_main_thread_notices_a_signal_delivered_to_another_thread(tmp_path, kind):
    # LitServer's main thread waits on its shutdown event until SIGINT/SIGTERM. With the manager's
    # plain event that wait never ends when the signal lands on another thread (the server would
    # ignore that SIGINT/SIGTERM); the polling event ends it within SHUTDOWN_POLL_S.
    script = tmp_path / "wait_for_signal.py"
    script.write_text(SIGNAL_TO_ANOTHER_THREAD)
    process = subprocess.Popen([sys.executable, str(script), kind], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    try:
        assert process.stdout.readline().strip() == "waiting", process.stderr.read()
        try:
            process.wait(timeout=5)  # the signal comes 0.3 s into the wait
        except subprocess.TimeoutExpired:
            assert kind == "plain", "the polling event did not notice the signal within 5 s"
            return
        assert kind == "polling", "the plain event was expected to hang"
        out = process.stdout.read()
    finally:
        if process.poll() is None:
            stop_process_group(process.pid, timeout=3)  # the script and its manager process (which ignores SIGINT)
            process.wait(5)
    assert process.returncode == 0 and out.strip() == "interrupted", out
