"""In-process parts of serving/: configuration, auth headers, runtime, model URIs, batching loop."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from serving.config import ConfigError, ServerConfig, cpu_threads_per_worker, load_config
from serving.cpus import cpu_count
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
    (["--model", "m.onnx", "--worker-spin-us", "-1"], {"API_KEY": "k"}, "--worker-spin-us"),
    (["--model", "m.onnx"], {"API_KEY": "k", "ONNXSHIP_ORT_SPINNING": "sometimes"}, "--ort-spinning"),
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
    # on a GPU replica the cores decode: one HTTP process each, whatever the number of GPUs
    assert gpu.api_servers == max(gpu.workers, cpu_count())
    # --ort-spinning auto: spin only in a call that has the cores to itself on CPU; always with CUDA
    assert (config.ort_spinning, gpu.ort_spinning) == ("alone", "on")
    assert ServerConfig(model="m", no_auth=True, ort_spinning="off").resolved("cpu").ort_spinning == "off"


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


def test_spinning_policies_configure_onnx_runtime_threads():
    from serving.runtime import cpu_session_options

    def entries(spinning):
        options = cpu_session_options(2, spinning)

        def entry(key):
            try:
                return options.get_session_config_entry(key)
            except RuntimeError:  # not set
                return None

        return [entry("session.intra_op.allow_spinning"), entry("session.force_spinning_stop")]

    # "run": spin inside a call, stop when it returns; "on": ORT's default; "off": never spin
    assert [entries(s) for s in ("run", "on", "off")] == [["1", "1"], ["1", None], ["0", None]]
    with pytest.raises(ValueError, match="alone"):
        cpu_session_options(2, "alone")  # two sessions: only a Classifier makes that


def test_alone_spins_only_in_a_call_that_has_the_cores_to_itself(default_artifact, images_dir, monkeypatch):
    import serving.runtime as runtime

    classifier = Classifier(default_artifact, device="cpu", intra_op_threads=2, spinning="alone")
    image = classifier.load_input(images_dir / "coffee.png")
    used = []
    for name in ("session", "spinning_session"):
        session = getattr(classifier, name)
        monkeypatch.setattr(classifier, name, type("Spy", (), {
            "run": lambda self, outputs, feeds, _s=session, _n=name: used.append(_n) or _s.run(outputs, feeds)})())
    monkeypatch.setattr(runtime, "cores_to_spare", lambda cores: 2)  # nothing else runnable
    alone = classifier.predict(image)
    monkeypatch.setattr(runtime, "cores_to_spare", lambda cores: 1)  # one core taken (decoding, another worker)
    busy = classifier.predict(image)
    assert used == ["spinning_session", "session"]
    assert np.array_equal(alone, busy)  # the same model, threads that wait differently
    assert Classifier(default_artifact, device="cpu", intra_op_threads=1).spinning_session is None  # default: off
    # one thread: no pool to spin, so no second session
    assert Classifier(default_artifact, device="cpu", intra_op_threads=1, spinning="alone").spinning_session is None


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


class FakeInbox:
    """What a worker's GreedyBatchLoop reads: descriptors, and the slot arrays of shared memory."""

    def __init__(self, descriptors, slots=16):
        self.queue = list(descriptors)
        self.slot_seq = [0] * slots
        self.slot_cancel = [0] * slots
        self.slot_taken = [-1] * slots
        self.images = np.zeros((slots, 2, 2, 3), np.uint8)

    def receive(self, timeout):
        return self.queue.pop(0) if self.queue else None

    def images_on_the_way(self):
        return 0

    def parent_gone(self):
        return False


class FakeAnswers:
    def __init__(self):
        self.dropped_ids = []

    def dropped(self, descriptor, worker):
        self.dropped_ids.append(descriptor.req_id)


def descriptor(req_id, slots, deadline_in=30.0, mode=0, k=1, seq=0):
    from serving.handoff import Descriptor

    now = time.monotonic()
    return Descriptor(req_id, 0, seq, mode, k, tuple(slots), now, now + deadline_in)


def test_greedy_batch_loop_counts_images_not_requests():
    from types import SimpleNamespace

    from serving.batching import GreedyBatchLoop

    inbox = FakeInbox([descriptor(1, [0, 1, 2]), descriptor(2, [3, 4, 5]), descriptor(3, [6, 7, 8])])
    api = SimpleNamespace(max_batch_size=5, batch_timeout=0.0)
    payloads = GreedyBatchLoop().collect(api, inbox, FakeAnswers())
    assert [uid for _, uid, _ in payloads] == [(1, 0), (2, 0)]  # 3 + 3 images reach the limit of 5
    assert [request.count for _, _, request in payloads] == [3, 3] and len(inbox.queue) == 1
    assert inbox.slot_taken[0] == inbox.slot_taken[3] == 0  # the worker marks what it took


def test_batch_loop_drops_stale_cancelled_and_expired_requests_before_inference():
    from types import SimpleNamespace

    from serving.batching import GreedyBatchLoop

    inbox = FakeInbox([descriptor(1, [0]), descriptor(2, [1], seq=7), descriptor(3, [2]),
                       descriptor(4, [3], deadline_in=-1), descriptor(5, [4])])
    inbox.slot_cancel[2] = 1  # client 3 disconnected
    answers = FakeAnswers()
    payloads = GreedyBatchLoop().collect(SimpleNamespace(max_batch_size=8, batch_timeout=0.0), inbox, answers)
    assert [uid[0] for _, uid, _ in payloads] == [1, 5]
    assert answers.dropped_ids == [3, 4]  # answered "dropped"; 2 is a stale message (slot reallocated): ignored


def test_stop_message_ends_the_worker_loop():
    from types import SimpleNamespace

    from serving.batching import GreedyBatchLoop
    from serving.handoff import STOP
    from serving.litserve_bridge import StopWorker

    loop = GreedyBatchLoop()
    inbox = FakeInbox([descriptor(1, [0]), STOP])
    api = SimpleNamespace(max_batch_size=8, batch_timeout=0.0)
    assert len(loop.collect(api, inbox, FakeAnswers())) == 1  # what came before STOP is still answered
    with pytest.raises(StopWorker):
        loop.collect(api, inbox, FakeAnswers())


def test_a_worker_waits_to_fill_a_batch_only_while_images_are_on_their_way():
    """--batch-timeout 5 s: a lone request is not held at all; a request being decoded is waited
    for and joins the batch; an upload that never arrives (it failed to decode) ends the wait."""
    from types import SimpleNamespace

    from serving.batching import GreedyBatchLoop
    from serving.handoff import SharedState

    state = SharedState(servers=1, slots_per_server=8, workers=1, image_shape=(2, 2, 3))
    inbox, loop = state.for_worker(), GreedyBatchLoop()
    api = SimpleNamespace(max_batch_size=8, batch_timeout=5.0)

    def send(req_id, slot):
        state.request_send.send(descriptor(req_id, [slot]).pack())

    def later(seconds, *actions):
        def run():
            time.sleep(seconds)
            for action in actions:
                action()
        threading.Thread(target=run, daemon=True).start()

    def collect():
        start = time.monotonic()
        payloads = loop.collect(api, inbox, FakeAnswers())
        return [uid[0] for _, uid, _ in payloads], time.monotonic() - start

    send(1, 0)
    ids, waited = collect()
    assert ids == [1] and waited < 1.0  # nothing was being decoded: no reason to wait 5 s

    state.decoding[0] = 1  # an HTTP process is decoding one image
    send(2, 1)
    later(0.2, lambda: send(3, 2), lambda: state.decoding.__setitem__(0, 0))
    ids, waited = collect()
    assert ids == [2, 3] and 0.15 < waited < 2.5

    state.decoding[0] = 1
    send(4, 3)
    later(0.2, lambda: state.decoding.__setitem__(0, 0))  # ... and it turned out undecodable (a 400)
    ids, waited = collect()
    assert ids == [4] and 0.15 < waited < 2.5


def test_an_http_process_counts_images_as_on_their_way_from_slots_to_hand_off():
    import asyncio

    from serving.dispatch import DeadlineExceeded, Dispatcher
    from serving.handoff import W_READY, SharedState

    state = SharedState(servers=2, slots_per_server=4, workers=1, image_shape=(2, 2, 3))
    state.worker_status[0] = W_READY
    dispatcher = Dispatcher(state, 1)
    slots = dispatcher.acquire(3)
    assert list(state.decoding) == [0, 3]
    dispatcher.release(slots, handed_off=False)  # the upload did not decode (400)
    assert list(state.decoding) == [0, 0] and dispatcher.held == 0

    async def hand_off(slots):
        dispatcher.start()
        outcome = asyncio.get_running_loop().create_future()
        try:
            dispatcher.submit(slots, "class", 1, time.monotonic() + 0.05, outcome.set_result)
            return await outcome
        finally:
            dispatcher.stop()

    slots = dispatcher.acquire(2)
    assert isinstance(asyncio.run(hand_off(slots)), DeadlineExceeded)  # no worker here to answer
    assert list(state.decoding) == [0, 0]
    assert state.for_worker().receive(0.0).slots == tuple(slots)  # handed off: queued, no longer "on the way"


def test_descriptors_and_fragmented_answers_round_trip():
    from serving.handoff import ANSWER, FRAGMENT_BYTES, Descriptor, answer_records

    d = Descriptor(2**60 + 5, 3, 42, 1, 5, (7, 8, 9), 1.5, 2.5)
    assert Descriptor.unpack(d.pack()) == d
    payload = bytes(range(256)) * (FRAGMENT_BYTES // 100)
    records = answer_records(9, 1, 0, 0, 5, 3, payload)
    assert len(records) == -(-len(payload) // FRAGMENT_BYTES) > 1
    assert b"".join(r[ANSWER.size:] for r in records) == payload
    assert [ANSWER.unpack_from(r)[6:8] for r in records] == [(i, len(records)) for i in range(len(records))]


# ---------------------------------------------------------------- readiness and admission


def test_ready_reports_starting_degraded_and_draining(default_artifact, tmp_path):
    """The /ready route of the real app over the shared worker states."""
    from fastapi.testclient import TestClient

    from serving.app import ModelInfo, build_app
    from serving.artifact import file_sha256, read_metadata
    from serving.handoff import F_DRAINING, F_STARTED, W_DEAD, W_READY, W_STARTING, SharedState

    config = ServerConfig(model=str(default_artifact), no_auth=True).resolved("cpu")
    info = ModelInfo(config, default_artifact, read_metadata(default_artifact), file_sha256(default_artifact), "cpu",
                     tmp_path)
    state = SharedState(1, 32, 2, (4, 4, 3))
    with TestClient(build_app(config, info, state, ["predict_0", "predict_1"])) as client:
        assert client.get("/health").json() == {"status": "ok"}
        assert client.get("/ready").json() == {"ready": False, "status": "starting",
                                               "workers": {"predict_0": "starting", "predict_1": "starting"}}
        state.worker_status[0] = W_READY
        assert client.get("/ready").status_code == 503  # start-up waits for every worker
        state.worker_status[1] = W_READY
        state.flags[F_STARTED] = 1
        assert client.get("/ready").json()["status"] == "ready"
        state.worker_status[1] = W_DEAD
        degraded = client.get("/ready")
        assert degraded.status_code == 200 and degraded.json()["status"] == "degraded"
        assert degraded.json()["workers"]["predict_1"] == "restarting"
        state.worker_status[0] = W_STARTING
        assert client.get("/ready").json()["status"] == "unavailable"
        state.worker_status[0] = W_READY
        state.flags[F_DRAINING] = 1
        draining = client.get("/ready")
        assert draining.status_code == 503 and draining.json()["status"] == "draining"
        state.worker_status[0] = W_STARTING
        shed = client.post("/predict", content=b"x", headers={"Content-Type": "image/jpeg"})
        assert shed.status_code == 503 and shed.headers["Retry-After"] == "1" and "no inference worker" in shed.text
        routes = {getattr(route, "path", None) for route in client.app.api.router.routes}
        assert "/docs" not in routes and "/openapi.json" not in routes
        assert client.post("/predict/", content=b"x").status_code == 404  # no redirect (no Host-built Location)


def test_admission_bound_and_slot_accounting():
    from serving.config import admission_bound
    from serving.dispatch import Dispatcher, Refused
    from serving.handoff import W_READY, SharedState

    assert admission_bound(2, 4, 2, 32) == 64 and admission_bound(1, 32, 1, 32) == 256
    assert admission_bound(2, 4, 2, 32, requested=500) == 500 and admission_bound(2, 4, 2, 32, requested=8) == 64
    state = SharedState(2, 8, 1, (2, 2, 3))
    dispatcher = Dispatcher(state, 1)
    with pytest.raises(Refused, match="no inference worker"):
        dispatcher.acquire(1)
    state.worker_status[0] = W_READY
    slots = dispatcher.acquire(5)
    assert set(slots) <= set(state.partition(1)) and dispatcher.held == 5
    with pytest.raises(Refused) as full:
        dispatcher.acquire(4)
    assert full.value.reason == "queue_full"
    dispatcher.release(slots)
    assert dispatcher.held == 0 and len(dispatcher.acquire(8)) == 8


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


def test_a_worker_that_just_served_polls_for_a_while_and_an_idle_one_sleeps(monkeypatch):
    import serving.handoff as handoff
    from serving.handoff import Descriptor, SharedState

    state = SharedState(1, 4, 1, (4, 4, 3))
    side = state.for_worker(spin_s=0.3)
    request = Descriptor(7, 0, 1, 0, 1, (2,), 0.0, 1e12)

    def cpu_seconds_waiting(timeout):
        start = time.thread_time()
        assert side.receive(timeout) is None
        return time.thread_time() - start

    monkeypatch.setattr(handoff, "cores_to_spare", lambda cores: 1)
    assert cpu_seconds_waiting(0.3) < 0.02  # idle (nothing served yet): sleeps at once
    side.serving = True
    cpu_seconds_waiting(0.05)  # a batch-fill wait shorter than the window ...
    assert side.serving  # ... leaves it serving
    assert cpu_seconds_waiting(0.4) > 0.03  # just served, a core to spare: polled (0.3 s), then slept
    assert cpu_seconds_waiting(0.3) < 0.02  # that window passed in vain: idle again
    side.serving = True
    monkeypatch.setattr(handoff, "cores_to_spare", lambda cores: 0)
    assert cpu_seconds_waiting(0.3) < 0.02  # every core busy: sleeps at once
    side.serving = True
    monkeypatch.setattr(handoff, "cores_to_spare", lambda cores: 1)
    sender = threading.Timer(0.05, lambda: state.request_send.send(request.pack()))
    sender.start()
    assert side.receive(1.0) == request  # found while polling
    sender.join()


def test_prediction_replies_and_query_parsing():
    """What the protocol path writes itself: a whole HTTP/1.1 response (uvicorn's default headers,
    JSON like Starlette's, `connection: close` when not kept alive), and k read from the raw
    query string as Starlette reads it (decoded, the last value wins)."""
    from serving.prediction import Reply, header_dict, query_value

    reply = Reply.error(503, "busy: é", {"Retry-After": "1"})
    raw = reply.http([(b"server", b"uvicorn")], keep_alive=False)
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.split(b"\r\n") == [b"HTTP/1.1 503 Service Unavailable", b"server: uvicorn",
                                   b"content-type: application/json", b"content-length: %d" % len(body),
                                   b"retry-after: 1", b"connection: close"]
    assert json.loads(body) == {"error": "busy: é", "status": 503} and "é".encode() in body
    closing = Reply.error(413, "too large", {"Connection": "close"})
    assert closing.closes and closing.http([], keep_alive=True).count(b"connection: close") == 1
    assert b"connection" not in Reply(200, {"a": 1}).http([], keep_alive=True)
    assert query_value(b"k=3&x=1&k=%37", "k", "5") == "7" and query_value(b"", "k", "5") == "5"
    assert query_value(b"k=+2", "k", "5") == " 2"  # then refused: not an integer (422)
    assert header_dict([(b"X-API-Key", b"a"), (b"x-api-key", b"b")]) == {"x-api-key": "a"}


def test_prediction_route_decodes_one_image_per_loop_turn_and_large_images_in_a_thread(monkeypatch, jpeg_bytes):
    """Typical photos decode in the event loop, one image per loop turn, so that whatever else the
    loop has to do (another connection, /health, a rejection) runs between two decodes; a request
    with an image over INLINE_DECODE_PIXELS decodes in the thread, leaving the loop free meanwhile."""
    import asyncio
    import base64
    import io
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    import serving.prediction as prediction
    from serving.auth import ApiKeyAuth
    from serving.dispatch import Dispatcher
    from serving.handoff import W_READY, SharedState
    from serving.ingress import Limits
    from serving.metrics import RequestMetrics

    events = []
    in_the_loop, in_a_thread = prediction.decode_one, prediction.decode_opened

    def one_image(opened, index, target, size, policy):
        events.append(("decode", threading.current_thread().name, index))
        in_the_loop(opened, index, target, size, policy)

    def whole_request(opened, targets, size, policy):
        events.append(("decode", threading.current_thread().name, "all"))
        in_a_thread(opened, targets, size, policy)

    monkeypatch.setattr(prediction, "decode_one", one_image)
    monkeypatch.setattr(prediction, "decode_opened", whole_request)
    large = io.BytesIO()
    Image.new("RGB", (2000, 1500), (200, 30, 30)).save(large, "PNG")
    two = json.dumps({"images": [base64.b64encode(jpeg_bytes).decode()] * 2}).encode()
    state = SharedState(servers=1, slots_per_server=8, workers=1, image_shape=(224, 224, 3))
    state.worker_status[0] = W_READY
    dispatcher = Dispatcher(state, 0)
    route = prediction.PredictionRoute(5.0, Limits(20 << 20, 8, 24_000_000, 64_000_000), ApiKeyAuth(None),
                                       [str(i) for i in range(1000)], 1000, 224, "center_crop", RequestMetrics())

    async def scenario():
        dispatcher.start()
        route.start(dispatcher, ThreadPoolExecutor(1, thread_name_prefix="decode"))
        loop = asyncio.get_running_loop()
        try:
            for body, media in ((two, b"application/json"), (jpeg_bytes, b"image/jpeg"),
                                (large.getvalue(), b"image/png")):
                call = route.begin("POST", "/predict", b"", [(b"content-type", media)], events.append)
                route.receive_body(call, body)
            loop.call_soon(events.append, ("other work",))
            while len([e for e in events if e[0] == "decode"]) < 4 or state.decoding[0]:
                await asyncio.sleep(0.01)
        finally:
            dispatcher.stop()

    asyncio.run(scenario())
    loop_thread = threading.current_thread().name
    in_the_thread = [e for e in events if e[0] == "decode" and e[1] != loop_thread]
    assert [e for e in events if e not in in_the_thread] == [("decode", loop_thread, 0), ("other work",),
                                                             ("decode", loop_thread, 1), ("decode", loop_thread, 0)]
    assert len(in_the_thread) == 1 and in_the_thread[0][1].startswith("decode"), events  # the large image
    assert not [e for e in events if isinstance(e, prediction.Reply)], events  # all three handed off


def test_a_bug_on_the_prediction_path_is_a_logged_500_for_that_request_only(monkeypatch, jpeg_bytes, caplog):
    """No request is left without an answer: an unexpected error while reading the uploads (here
    a broken open_all) answers 500, logs the traceback and gives the slots back."""
    import asyncio

    import serving.prediction as prediction
    from serving.auth import ApiKeyAuth
    from serving.dispatch import Dispatcher
    from serving.handoff import W_READY, SharedState
    from serving.ingress import Limits
    from serving.metrics import RequestMetrics

    def broken_open_all(*args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(prediction, "open_all", broken_open_all)
    state = SharedState(servers=1, slots_per_server=4, workers=1, image_shape=(224, 224, 3))
    state.worker_status[0] = W_READY
    dispatcher = Dispatcher(state, 0)
    route = prediction.PredictionRoute(5.0, Limits(20 << 20, 8, 24_000_000, 64_000_000), ApiKeyAuth(None),
                                       [str(i) for i in range(1000)], 1000, 224, "center_crop", RequestMetrics())
    replies = []

    async def scenario():
        dispatcher.start()
        route.start(dispatcher, None)
        call = route.begin("POST", "/predict", b"", [(b"content-type", b"image/jpeg")], replies.append)
        route.receive_body(call, jpeg_bytes)
        dispatcher.stop()

    asyncio.run(scenario())
    [reply] = replies
    assert reply.status == 500 and json.loads(reply.body)["error"] == prediction.INTERNAL_ERROR
    assert "a bug" in caplog.text and dispatcher.held == 0 and list(state.decoding) == [0]
