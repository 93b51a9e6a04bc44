"""The smaller holes of issue 10, each against a real server: client disconnects, hostile JSON,
pixel budgets, slow headers and bodies, redirects, API docs, limit messages."""

from __future__ import annotations

import io
import json
import re
import socket
import time

import pytest
import requests
from PIL import Image

from tests.serving.conftest import API_KEY, running
from tests.serving.test_api import assert_error, files, metric_values, post


def raw_connection(server) -> socket.socket:
    host, port = server.url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=30)


def read_response(sock: socket.socket) -> bytes:
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, socket.timeout):
            return data
        if not chunk:
            return data
        data += chunk


def wait_for(condition, timeout: float = 20.0, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def test_client_disconnect_mid_upload_is_counted_not_a_500(server, jpeg_bytes):
    before = metric_values(server, "onnxship_client_disconnects_total").get(
        'onnxship_client_disconnects_total{stage="upload"}', 0.0)
    log_before = len(server.log().splitlines())
    for _ in range(5):
        sock = raw_connection(server)
        head = (f"POST /predict HTTP/1.1\r\nHost: x\r\nX-API-Key: {API_KEY}\r\nContent-Type: image/jpeg\r\n"
                f"Content-Length: {len(jpeg_bytes)}\r\n\r\n").encode()
        sock.sendall(head + jpeg_bytes[: len(jpeg_bytes) // 3])
        time.sleep(0.05)
        sock.close()
    counted = wait_for(lambda: metric_values(server, "onnxship_client_disconnects_total").get(
        'onnxship_client_disconnects_total{stage="upload"}', 0.0) >= before + 5)
    assert counted, metric_values(server, "onnxship_client_disconnects_total")
    new_lines = server.log().splitlines()[log_before:]
    assert len(new_lines) <= 5 and not any("Traceback" in line or " 500" in line for line in new_lines), new_lines
    text = requests.get(f"{server.url}/metrics", timeout=10).text
    assert not re.search(r'onnxship_requests_total\{endpoint="/predict",status="500"\} [1-9]', text)


def split_responses(data: bytes) -> list[tuple[int, dict]]:
    """(status, JSON body) of each Content-Length-framed response in `data`."""
    responses = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        length = int(re.search(rb"content-length: (\d+)", head, re.IGNORECASE).group(1))
        responses.append((int(head.split()[1]), json.loads(rest[:length])))
        data = rest[length:]
    return responses


def request_bytes(path: str, body: bytes, *headers: str) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: x", "Content-Type: image/jpeg", f"Content-Length: {len(body)}", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def test_pipelined_requests_are_answered_in_order(server, jpeg_bytes):
    """Three requests in one write: the prediction routes' own path takes the first, uvicorn's
    queue the ones behind it, and the answers come back in the order asked."""
    key = f"X-API-Key: {API_KEY}"
    sock = raw_connection(server)
    sock.sendall(request_bytes("/predict", jpeg_bytes, key) + request_bytes("/predict/top?k=2", jpeg_bytes, key)
                 + b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    answers = split_responses(read_response(sock))
    sock.close()
    assert [status for status, _ in answers] == [200, 200, 200], answers
    assert "class_id" in answers[0][1] and len(answers[1][1]["predictions"]) == 2 and answers[2][1] == {"status": "ok"}


def test_expect_100_continue(server, jpeg_bytes):
    """curl sends `Expect: 100-continue` with large uploads: an accepted request gets its 100 and
    then its answer on the same connection; a refused one its error at once, and the connection
    closes (the client may never send the body it held back)."""
    accepted, refused = raw_connection(server), raw_connection(server)
    head, _, body = request_bytes("/predict", jpeg_bytes, f"X-API-Key: {API_KEY}", "Expect: 100-continue",
                                  "Connection: close").partition(b"\r\n\r\n")
    accepted.sendall(head + b"\r\n\r\n")
    assert accepted.recv(1024) == b"HTTP/1.1 100 Continue\r\n\r\n"
    accepted.sendall(body)
    [(status, answer)] = split_responses(read_response(accepted))
    assert status == 200 and "class_id" in answer
    head, _, _ = request_bytes("/predict", jpeg_bytes, "X-API-Key: nope", "Expect: 100-continue").partition(b"\r\n\r\n")
    refused.sendall(head + b"\r\n\r\n")
    start = time.monotonic()
    [(status, answer)] = split_responses(read_response(refused))  # returns when the server closes
    assert status == 401 and time.monotonic() - start < 5, answer
    accepted.close()
    refused.close()


@pytest.mark.parametrize("body", [b"[" * 100_000 + b"]" * 100_000, b'{"image": ' * 50_000])
def test_deeply_nested_json_is_400(server, body):
    assert_error(post(server, data=body, headers={"Content-Type": "application/json"}), 400, "json")


def test_too_many_images_names_the_real_limit(server, jpeg_bytes):
    response = post(server, files=[("file", (f"{i}.jpg", jpeg_bytes, "image/jpeg")) for i in range(33)])
    assert_error(response, 400, "limit is 32", "--max-images-per-request")
    assert "33" not in response.json()["error"].replace("more than 32", "")
    many = post(server, json={"images": ["aGVsbG8="] * 33})
    assert_error(many, 400, "33 images", "limit is 32")


def png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buffer, "PNG", optimize=True)
    return buffer.getvalue()


def test_pixel_budgets_refuse_before_decoding(default_artifact, tmp_path, jpeg_bytes):
    with running(default_artifact, tmp_path, "--workers", "1", "--max-image-pixels", "4000000",
                 "--max-request-pixels", "6000000") as server:
        big = png(2500, 2000)  # 5 MP declared, a few KB on the wire
        assert len(big) < 100_000
        assert_error(post(server, files=files(big, "big.png")), 400, "exceeds the limit of 4,000,000")
        three = [("file", (f"{i}.png", png(1600, 1300), "image/png")) for i in range(3)]  # 2.08 MP each
        assert_error(post(server, files=three), 400, "--max-request-pixels")
        assert post(server, files=three[:2]).status_code == 200
        # a JPEG counts at the size DCT scaling decodes: 12 MP declared, ~0.2 MP decoded
        photo = io.BytesIO()
        Image.open(io.BytesIO(jpeg_bytes)).convert("RGB").resize((4000, 3000)).save(photo, "JPEG", quality=70)
        assert post(server, files=files(photo.getvalue(), "photo.jpg")).status_code == 200


def test_slow_headers_are_cut_off(server):
    sock = raw_connection(server)
    sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\n")  # ...and never the rest of the headers
    sock.settimeout(20)
    assert read_response(sock) == b""  # closed by the server (--header-timeout 2), not held forever
    idle = raw_connection(server)  # a connection that sends nothing at all
    idle.settimeout(20)
    assert read_response(idle) == b""


def test_slow_body_gets_408(server, jpeg_bytes):
    sock = raw_connection(server)
    sock.sendall((f"POST /predict HTTP/1.1\r\nHost: x\r\nX-API-Key: {API_KEY}\r\nContent-Type: image/jpeg\r\n"
                  f"Content-Length: {len(jpeg_bytes)}\r\n\r\n").encode() + jpeg_bytes[:100])
    sock.settimeout(20)
    answer = read_response(sock)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"--body-timeout" in answer


def test_no_redirect_before_auth_and_no_host_built_location(server, jpeg_bytes):
    for path in ("/predict/", "/predict/top/", "/model/"):
        response = requests.post(f"{server.url}{path}", files=files(jpeg_bytes), allow_redirects=False,
                                 headers={"Host": "evil.example"}, timeout=30)
        assert response.status_code in (404, 405) and "location" not in response.headers, (path, response.headers)
        assert set(response.json()) == {"error", "status"}


def test_api_docs_are_off_unless_asked_for(server, default_artifact, tmp_path):
    for path in ("/docs", "/openapi.json", "/redoc"):
        assert requests.get(f"{server.url}{path}", timeout=10).status_code == 404, path
    with running(default_artifact, tmp_path, "--workers", "1", "--docs") as with_docs:
        assert requests.get(f"{with_docs.url}/docs", timeout=10).status_code == 200
        assert "/predict" in requests.get(f"{with_docs.url}/openapi.json", timeout=10).json()["paths"]
