"""The HTTP API against a real server: the seed's contract, every bad input, auth, batching, metrics."""

from __future__ import annotations

import base64
import json
import re
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.serving.conftest import API_KEY, decompression_bomb_png

CATS = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat


@pytest.fixture(scope="module")
def expected(default_artifact):
    """What the same artifact answers in-process (serving.runtime.Classifier): the server must agree."""
    from serving.runtime import Classifier

    classifier = Classifier(default_artifact, device="cpu", intra_op_threads=1)

    def best(data: bytes) -> tuple[int, float]:
        probabilities = classifier.predict(classifier.load_input(data))[0]
        return int(probabilities.argmax()), float(probabilities.max())

    return best


@pytest.fixture(scope="module")
def cat(expected, jpeg_bytes) -> int:
    return expected(jpeg_bytes)[0]


def post(server, path="/predict", headers=None, **kwargs):
    return requests.post(f"{server.url}{path}", headers={**server.headers, **(headers or {})}, timeout=60, **kwargs)


def files(data: bytes, name="image.jpg", field="file"):
    return [(field, (name, data, "application/octet-stream"))]


def assert_error(response, status: int, *words: str):
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "status"}, body
    for word in words:
        assert word.lower() in body["error"].lower(), body


def metric_values(server, name: str) -> dict[str, float]:
    text = requests.get(f"{server.url}/metrics", timeout=10).text
    values = {}
    for line in text.splitlines():
        if line.startswith(name):
            key, value = line.rsplit(" ", 1)
            values[key] = float(value)
    return values


# ---------------------------------------------------------------- the seed's contract


def test_health_and_ready_need_no_key(server):
    assert requests.get(f"{server.url}/health", timeout=10).json() == {"status": "ok"}
    ready = requests.get(f"{server.url}/ready", timeout=10)
    assert ready.status_code == 200
    assert ready.json() == {"ready": True, "status": "ready", "workers": {"predict_0": "ready", "predict_1": "ready"}}


def test_predict_multipart_matches_the_seed(server, images_dir, expected):
    data = (images_dir / "chelsea.png").read_bytes()
    response = post(server, files=files(data, "chelsea.png"))
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"class_id", "confidence", "processing_time", "label"}
    class_id, confidence = expected(data)
    assert body["class_id"] == class_id and body["confidence"] == pytest.approx(confidence, abs=1e-5)
    assert body["label"] in ("Egyptian cat", "tabby", "tiger cat")
    assert 0 < body["confidence"] <= 1 and body["processing_time"] > 0


def test_predict_raw_body_and_base64_json_agree(server, jpeg_bytes, cat):
    raw = post(server, data=jpeg_bytes, headers={"Content-Type": "image/jpeg"}).json()
    as_json = post(server, json={"image": base64.b64encode(jpeg_bytes).decode()}).json()
    multipart = post(server, files=files(jpeg_bytes)).json()
    assert raw["class_id"] == as_json["class_id"] == multipart["class_id"] == cat
    assert raw["confidence"] == pytest.approx(as_json["confidence"]) == pytest.approx(multipart["confidence"])


def test_predict_top_k(server, jpeg_bytes, cat):
    response = post(server, "/predict/top", params={"k": 3}, files=files(jpeg_bytes))
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"predictions", "processing_time"}
    predictions = body["predictions"]
    assert len(predictions) == 3 and predictions[0]["class_id"] == cat
    assert all(set(p) == {"class_id", "confidence", "label"} for p in predictions)
    confidences = [p["confidence"] for p in predictions]
    assert confidences == sorted(confidences, reverse=True)
    default = post(server, "/predict/top", files=files(jpeg_bytes)).json()
    assert len(default["predictions"]) == 5


def test_several_files_return_one_result_per_image_in_order(server, images_dir, jpeg_bytes, expected, cat):
    coffee = expected((images_dir / "coffee.png").read_bytes())[0]
    parts = [("file", ("a.png", (images_dir / "coffee.png").read_bytes(), "image/png")),
             ("file", ("b.jpg", jpeg_bytes, "image/jpeg")),
             ("file", ("c.png", (images_dir / "coffee.png").read_bytes(), "image/png"))]
    body = post(server, files=parts).json()
    assert body["count"] == 3 and len(body["results"]) == 3
    assert [r["class_id"] for r in body["results"]] == [coffee, cat, coffee]
    top = post(server, "/predict/top", params={"k": 2}, files=parts).json()
    assert [r["predictions"][0]["class_id"] for r in top["results"]] == [coffee, cat, coffee]


@pytest.mark.parametrize("name", ["grayscale.png", "cmyk.jpg", "rgba.png", "sixteen_bit.png", "palette.gif",
                                  "exif_rotated.jpg", "webp.webp"])
def test_awkward_but_valid_images_classify(server, awkward_images, expected, name):
    response = post(server, files=files(awkward_images[name], name))
    assert response.status_code == 200, response.text
    assert response.json()["class_id"] == expected(awkward_images[name])[0]
    if name in ("cmyk.jpg", "rgba.png", "exif_rotated.jpg", "webp.webp"):
        assert response.json()["class_id"] in CATS, name  # colour kept, EXIF orientation applied


# ---------------------------------------------------------------- client mistakes: 4xx that name the problem


def test_bad_inputs_are_client_errors(server, jpeg_bytes):
    assert_error(post(server, files=[("note", (None, "just text"))]), 400, "no file")
    assert_error(post(server, files=files(b"", "empty.jpg")), 400, "empty")
    assert_error(post(server, files=files(b"definitely not an image" * 10, "x.jpg")), 400, "not an image")
    assert_error(post(server, files=files(jpeg_bytes[: len(jpeg_bytes) // 2], "half.jpg")), 400, "truncated")
    assert_error(post(server, files=files(decompression_bomb_png(), "bomb.png")), 400, "bomb")
    assert_error(post(server, files=files(jpeg_bytes, field="image")), 400, "wrong field name", "'file'")
    assert_error(post(server, json={"image": "%%% not base64 %%%"}), 400, "base64")
    assert_error(post(server, json={"picture": "abc"}), 400, "no 'image' field")
    assert_error(post(server, json=[1, 2]), 400, "object")
    assert_error(post(server, data=b'{"image": ', headers={"Content-Type": "application/json"}), 400, "malformed json")
    assert_error(post(server, data=b"", headers={"Content-Type": "application/json"}), 400, "empty json")
    assert_error(post(server), 400, "no image")
    assert_error(post(server, data=b"hello", headers={"Content-Type": "text/plain"}), 415, "text/plain")
    assert_error(post(server, data=b"x", headers={"Content-Type": "multipart/form-data"}), 400, "multipart")


def test_huge_body_is_413(server):
    assert_error(post(server, data=b"\xff" * 2_500_000, headers={"Content-Type": "image/jpeg"}), 413, "bytes")

    def chunks():  # no Content-Length: the limit is enforced while streaming
        for _ in range(30):
            yield b"\xff" * 100_000

    assert_error(post(server, data=chunks(), headers={"Content-Type": "image/jpeg"}), 413)


@pytest.mark.parametrize("path", ["/predict", "/predict/top"])
def test_prediction_routes_take_only_post(server, path):
    for method in ("GET", "PUT", "DELETE"):
        response = requests.request(method, f"{server.url}{path}", headers=server.headers, timeout=30)
        assert_error(response, 405, "method not allowed")
        assert response.headers["allow"] == "POST"
    assert re.search(rf'onnxship_requests_total\{{endpoint="{path}",status="405"\}} [1-9]',
                     requests.get(f"{server.url}/metrics", timeout=10).text)


@pytest.mark.parametrize("k", ["0", "1001", "-3", "abc"])
def test_k_out_of_range_is_422(server, jpeg_bytes, k):
    assert_error(post(server, "/predict/top", params={"k": k}, files=files(jpeg_bytes)), 422, "k")


def test_bad_image_among_several_names_the_file(server, jpeg_bytes):
    parts = [("file", ("good.jpg", jpeg_bytes, "image/jpeg")), ("file", ("bad.jpg", b"garbage" * 20, "image/jpeg"))]
    assert_error(post(server, files=parts), 400, "bad.jpg", "not an image")


def test_bad_requests_never_fail_concurrent_good_ones(server, jpeg_bytes, cat):
    def send(i):
        data = jpeg_bytes if i % 2 == 0 else jpeg_bytes[:200]
        return i, post(server, files=files(data))

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(send, range(32)))
    for i, response in results:
        if i % 2 == 0:
            assert response.status_code == 200 and response.json()["class_id"] == cat
        else:
            assert response.status_code == 400


# ---------------------------------------------------------------- auth


@pytest.mark.parametrize("path", ["/predict", "/predict/top"])
def test_missing_or_wrong_key_is_401(server, jpeg_bytes, path):
    missing = requests.post(f"{server.url}{path}", files=files(jpeg_bytes), timeout=30)
    assert_error(missing, 401, "missing api key")
    wrong = requests.post(f"{server.url}{path}", files=files(jpeg_bytes), headers={"X-API-Key": "nope"}, timeout=30)
    assert_error(wrong, 401, "invalid api key")
    bearer_wrong = requests.post(f"{server.url}{path}", files=files(jpeg_bytes),
                                 headers={"Authorization": "Bearer nope"}, timeout=30)
    assert_error(bearer_wrong, 401)
    assert requests.get(f"{server.url}/model", timeout=30).status_code == 401


def test_both_header_styles_and_gateway_token(server, jpeg_bytes):
    url = f"{server.url}/predict"
    assert requests.post(url, files=files(jpeg_bytes), headers={"X-API-Key": API_KEY}, timeout=30).status_code == 200
    assert requests.post(url, files=files(jpeg_bytes), headers={"Authorization": f"Bearer {API_KEY}"},
                         timeout=30).status_code == 200
    # behind Cerebrium's gateway: Authorization carries the platform's JWT, X-API-Key the app key
    behind_gateway = {"Authorization": "Bearer eyJ.platform.jwt", "X-API-Key": API_KEY}
    assert requests.post(url, files=files(jpeg_bytes), headers=behind_gateway, timeout=30).status_code == 200
    assert API_KEY not in server.log()


# ---------------------------------------------------------------- metadata and metrics


def test_model_metadata(server, default_artifact):
    from serving.artifact import file_sha256

    info = requests.get(f"{server.url}/model", headers=server.headers, timeout=30).json()
    assert info["sha256"] == file_sha256(default_artifact)
    assert (info["name"], info["version"], info["run_id"]) == ("onnxship-test", "7", "run123")
    assert info["arch"] and info["input_size"] > 0 and info["num_classes"] == 1000
    assert info["providers"] == ["CPUExecutionProvider"] and info["device"] == "cpu"
    assert len(info["workers"]) == 2 and {w["worker"] for w in info["workers"]} == {0, 1}
    assert info["batching"]["max_batch_size"] == 8
    assert "gpu" not in info and all("tensorrt_cache" not in w for w in info["workers"])


def test_time_to_ready_counts_from_the_process_start(server):
    info = requests.get(f"{server.url}/model", headers=server.headers, timeout=30).json()
    startup = info["startup"]
    assert all(w["session_build_s"] > 0 and w["warmup_s"] > 0 for w in info["workers"])
    # from the main process's start (interpreter and imports included), so more than the slowest
    # worker's model load, and no more than the test saw between spawning the server and /ready
    assert 0 < startup["session_build_s"] + startup["warmup_s"] < startup["ready_after_s"]
    assert startup["ready_after_s"] < time.monotonic() - server.started
    deadline = time.monotonic() + 5  # the supervisor logs it at its next tick after /ready
    while " ready in " not in server.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert f"ready in {startup['ready_after_s']:.2f} s: 2 inference worker(s)" in server.log()


def test_a_lone_request_does_not_wait_out_the_batch_timeout(default_artifact, tmp_path, jpeg_bytes, server):
    """A worker waits to fill a batch only while more images are being decoded: with a 4 s batch
    timeout a lone client is still answered at once, and concurrent clients are still batched.
    This server has a GPU replica's worker policy (--worker-sched batch), the CPU one the default."""
    import os

    from tests.serving.conftest import running

    def worker_policies(running_server) -> set[int]:
        notes = requests.get(f"{running_server.url}/model", headers=running_server.headers, timeout=30).json()
        return {os.sched_getscheduler(note["pid"]) for note in notes["workers"]}

    assert worker_policies(server) == {os.SCHED_OTHER}
    with running(default_artifact, tmp_path, "--workers", "1", "--max-batch-size", "8",
                 "--batch-timeout", "4", "--worker-sched", "batch") as slow_to_fill:
        assert worker_policies(slow_to_fill) == {os.SCHED_BATCH}
        for _ in range(3):
            start = time.monotonic()
            assert post(slow_to_fill, files=files(jpeg_bytes)).status_code == 200
            assert time.monotonic() - start < 2.0
        with ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(lambda _: post(slow_to_fill, files=files(jpeg_bytes)).status_code, range(16)))
        assert statuses == [200] * 16
        values = metric_values(slow_to_fill, "onnxship_batch_size")
        assert values["onnxship_batch_size_count"] < 3 + 16, "16 concurrent requests should share calls"


def test_concurrent_requests_are_batched(server, jpeg_bytes):
    def batches():
        values = metric_values(server, "onnxship_batch_size")
        return values["onnxship_batch_size_count"], values['onnxship_batch_size_bucket{le="1.0"}']

    count_before, singles_before = batches()
    with ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(lambda _: post(server, files=files(jpeg_bytes)).status_code, range(32)))
    assert statuses == [200] * 32
    count_after, singles_after = batches()
    calls = count_after - count_before
    assert 0 < calls < 32, "32 concurrent requests should need fewer than 32 ONNX Runtime calls"
    assert (count_after - singles_after) > (count_before - singles_before), "no batch held more than one image"


def test_metrics_count_requests_decodes_and_inference(server, jpeg_bytes):
    post(server, files=files(jpeg_bytes))
    post(server, files=files(b"garbage" * 10))
    text = requests.get(f"{server.url}/metrics", timeout=10).text
    for name in ("onnxship_requests_total", "onnxship_request_duration_seconds_bucket", "onnxship_batch_size_bucket",
                 "onnxship_inference_duration_seconds_bucket", "onnxship_images_decoded_total"):
        assert name in text, name
    assert re.search(r'onnxship_requests_total\{endpoint="/predict",status="200"\} [1-9]', text)
    assert re.search(r'onnxship_requests_total\{endpoint="/predict",status="400"\} [1-9]', text)
    assert re.search(r'onnxship_images_decoded_total\{outcome="rejected"\} [1-9]', text)
    assert json.dumps(API_KEY) not in text


def test_reference_images_classify_exactly_as_in_process(server, images_dir, default_artifact):
    """The hand-off changes nothing: every reference image gets the same top-5 classes, in the same
    order, as serving.runtime.Classifier on the same bytes."""
    from serving.runtime import Classifier, top_k

    classifier = Classifier(default_artifact, device="cpu", intra_op_threads=1)
    for path in sorted(images_dir.iterdir()):
        if path.suffix.lower() not in (".png", ".jpg", ".jpeg"):
            continue
        data = path.read_bytes()
        expected = top_k(classifier.predict(classifier.load_input(data))[0], 5)
        body = post(server, "/predict/top", params={"k": 5}, files=files(data, path.name)).json()
        assert [p["class_id"] for p in body["predictions"]] == [c for c, _ in expected], path.name
        assert [p["confidence"] for p in body["predictions"]] == pytest.approx([p for _, p in expected], abs=1e-5)
