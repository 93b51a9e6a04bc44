"""serving.client.ClassifierClient and scripts/test_server.py against the real server."""

from __future__ import annotations

import subprocess
import sys

import pytest

from serving.client import ClassifierClient, ClientError
from tests.serving.conftest import API_KEY, REPO_ROOT, free_port


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "scripts/test_server.py", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120)


def test_client_endpoints(server, images_dir):
    client = ClassifierClient(server.url, api_key=API_KEY)
    assert client.health() == {"status": "ok"}
    assert client.ready() is True
    client.wait_until_ready(timeout=5)
    assert client.model_info()["name"] == "onnxship-test"
    single = client.predict(images_dir / "coffee.png")
    assert single.label and 0 < single.confidence <= 1 and single.latency >= single.processing_time > 0
    top = client.predict_top((images_dir / "coffee.png").read_bytes(), k=4)
    assert len(top.predictions) == 4 and top.predictions[0].class_id == single.class_id
    many = client.predict_many([images_dir / "coffee.png", images_dir / "chelsea.png", images_dir / "coffee.png"])
    assert [p.class_id for p in many][0::2] == [single.class_id, single.class_id] and len(many) == 3


def test_client_gateway_token_goes_in_authorization(server, images_dir):
    client = ClassifierClient(server.url, api_key=API_KEY, gateway_token="platform-jwt")
    assert client.session.headers["Authorization"] == "Bearer platform-jwt"
    assert client.predict(images_dir / "coffee.png").class_id >= 0


def test_client_errors_name_url_status_and_reason(server, images_dir):
    with pytest.raises(ClientError) as wrong_key:
        ClassifierClient(server.url, api_key="wrong").predict(images_dir / "coffee.png")
    message = str(wrong_key.value)
    assert wrong_key.value.status == 401 and "/predict" in message and "invalid api key" in message.lower()
    with pytest.raises(ClientError) as refused:
        ClassifierClient(f"http://127.0.0.1:{free_port()}").health()
    assert refused.value.status is None and "connection refused" in str(refused.value)
    assert ClassifierClient(f"http://127.0.0.1:{free_port()}").ready() is False
    assert "wrong" not in repr(ClassifierClient(server.url, api_key="wrong"))


def test_script_prints_each_image_and_exits_zero(server, images_dir):
    result = run_script("--url", server.url, "--api-key", API_KEY, "--images",
                        str(images_dir / "coffee.png"), str(images_dir / "chelsea.png"), "--top-k", "2")
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith(("coffee.png", "chelsea.png"))]
    assert len(lines) == 2
    assert all("class" in line and "confidence" in line and "latency" in line for line in lines)


def test_script_fails_on_a_bad_key_or_a_bad_image(server, images_dir, tmp_path):
    wrong_key = run_script("--url", server.url, "--api-key", "wrong", "--images", str(images_dir / "coffee.png"))
    assert wrong_key.returncode == 1 and "401" in wrong_key.stderr
    not_image = tmp_path / "notes.jpg"
    not_image.write_text("hello")
    result = run_script("--url", server.url, "--api-key", API_KEY, "--images", str(images_dir / "coffee.png"),
                        str(not_image))
    assert result.returncode == 1 and "not an image" in result.stderr


def test_script_says_connection_refused(images_dir):
    result = run_script("--url", f"http://127.0.0.1:{free_port()}", "--images", str(images_dir / "coffee.png"))
    assert result.returncode == 2
    assert "connection refused" in result.stderr


def test_client_retries_a_busy_server_after_its_retry_after(slow_artifact, tmp_path, jpeg_bytes):
    """A 503 (queue full) carries Retry-After; a client with retries waits for it and is served.

    One thread keeps the only admission slot busy, back to back, so the outcome does not depend on
    how fast this machine runs the slow model; it lets go once the patient client was turned away."""
    import threading

    from tests.serving.conftest import running
    from tests.serving.test_holes import wait_for
    from tests.serving.test_overload import counter, predict

    with running(slow_artifact, tmp_path, "--workers", "1", "--api-servers", "1", "--max-batch-size", "1",
                 "--max-images-per-request", "1", "--max-queued-images", "1") as server:
        let_go = threading.Event()
        holder = threading.Thread(target=lambda: [predict(server, jpeg_bytes) for _ in iter(let_go.is_set, True)])
        holder.start()
        try:
            busy = first_refusal(ClassifierClient(server.url, api_key=API_KEY), jpeg_bytes)
            assert busy.status == 503 and busy.retry_after is not None and busy.retry_after > 0
            refused_before = counter(server, "onnxship_shed_total", reason="queue_full")
            answers = []
            patient = threading.Thread(target=lambda: answers.append(
                ClassifierClient(server.url, api_key=API_KEY, retries=2).predict(jpeg_bytes)))
            patient.start()
            turned_away = wait_for(lambda: counter(server, "onnxship_shed_total", reason="queue_full") > refused_before)
            let_go.set()
            patient.join(timeout=60)
        finally:
            let_go.set()
            holder.join(timeout=60)
        assert turned_away, "the patient client was never refused: the slot was not held"
        assert answers and answers[0].class_id >= 0


def first_refusal(client: ClassifierClient, data: bytes, attempts: int = 50) -> ClientError:
    """The first ClientError `client` meets sending `data` (a held slot frees for a moment between calls)."""
    for _ in range(attempts):
        try:
            client.predict(data)
        except ClientError as refused:
            return refused
    raise AssertionError(f"{attempts} requests and none refused: the slot was not held")
