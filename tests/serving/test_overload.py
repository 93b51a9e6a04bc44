"""Overload against a real server: fast 503s with Retry-After instead of an unbounded queue, a
polite client still served, /health answering, deadlines and disconnects dropped before
inference. No timing is asserted: behaviour is (every request got 200 or 503, none hung, ...).

The servers here run the slow null artifact (a fixed cost per ONNX Runtime call, whatever the
batch) with one worker, batches of one and a tiny admission bound, so a test client overloads them.
"""

from __future__ import annotations

import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import requests

from tests.serving.conftest import API_KEY, running
from tests.serving.test_api import files, metric_values
from tests.serving.test_holes import raw_connection, wait_for

TIGHT = ("--workers", "1", "--api-servers", "1", "--max-batch-size", "1", "--max-images-per-request", "2",
         "--intra-op-threads", "1")


def predict(server, data: bytes, timeout: float = 60):
    return requests.post(f"{server.url}/predict", files=files(data), headers=server.headers, timeout=timeout)


def counter(server, name: str, **labels) -> float:
    values = metric_values(server, name)
    key = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else "")
    return values.get(key, 0.0)


def test_overload_gets_fast_503s_while_a_polite_client_is_served(slow_artifact, tmp_path, jpeg_bytes):
    with running(slow_artifact, tmp_path, *TIGHT, "--max-queued-images", "3") as server:
        stop = threading.Event()
        flood, health, polite = [], [], []

        def flooder():
            while not stop.is_set():
                response = predict(server, jpeg_bytes)  # raises (fails the test) if a request hangs 60 s
                flood.append((response.status_code, response.headers.get("Retry-After"), response.json()))

        def prober():
            while not stop.is_set():
                health.append(requests.get(f"{server.url}/health", timeout=10).status_code)
                time.sleep(0.05)

        def polite_client():
            for _ in range(4):
                for _attempt in range(400):
                    response = predict(server, jpeg_bytes)
                    if response.status_code != 503:
                        break
                    time.sleep(0.05)  # a real client would wait Retry-After (1 s); shorter keeps the test fast
                polite.append(response.status_code)

        with ThreadPoolExecutor(12) as pool:
            futures = [pool.submit(flooder) for _ in range(10)] + [pool.submit(prober)]
            polite_done = pool.submit(polite_client)
            polite_done.result(timeout=300)
            stop.set()
            for future in futures:
                future.result(timeout=120)
        statuses = {status for status, _, _ in flood}
        assert statuses <= {200, 503}, statuses
        rejected = [(retry, body) for status, retry, body in flood if status == 503]
        assert rejected and all(retry == "1" and set(body) == {"error", "status"} for retry, body in rejected)
        assert "capacity" in rejected[0][1]["error"]
        assert polite == [200] * 4
        assert health and set(health) == {200}
        assert counter(server, "onnxship_shed_total", reason="queue_full") >= len(rejected)
        assert re.search(r"onnxship_queued_images \d", requests.get(f"{server.url}/metrics", timeout=10).text)


def test_a_rejected_request_gets_its_503_before_the_server_reads_its_body(slower_artifact, tmp_path, jpeg_bytes):
    with running(slower_artifact, tmp_path, *TIGHT, "--max-queued-images", "2") as server:
        with ThreadPoolExecutor(2) as pool:
            holding = [pool.submit(predict, server, jpeg_bytes) for _ in range(2)]
            assert wait_for(lambda: counter(server, "onnxship_queued_images") >= 2, timeout=60)
            sock = raw_connection(server)
            sock.sendall((f"POST /predict HTTP/1.1\r\nHost: x\r\nX-API-Key: {API_KEY}\r\n"
                          "Content-Type: image/jpeg\r\nContent-Length: 5000000\r\n\r\n").encode() + jpeg_bytes[:1000])
            sock.settimeout(30)
            head = sock.recv(65536)  # the other 4,999,000 bytes are never sent
            assert head.startswith(b"HTTP/1.1 503"), head[:300]
            assert b"retry-after: 1" in head.lower()
            sock.close()
            assert [f.result(timeout=120).status_code for f in holding] == [200, 200]


def test_requests_past_their_deadline_are_dropped_before_inference(slower_artifact, tmp_path, jpeg_bytes):
    with running(slower_artifact, tmp_path, *TIGHT, "--max-queued-images", "8", "--request-timeout", "0.5") as server:
        calls_before = counter(server, "onnxship_batch_size_count")
        with ThreadPoolExecutor(8) as pool:
            responses = list(pool.map(lambda _: predict(server, jpeg_bytes), range(8)))
        statuses = [r.status_code for r in responses]
        assert set(statuses) <= {200, 504, 503} and 504 in statuses, statuses
        timed_out = [r.json() for r in responses if r.status_code == 504]
        assert all("--request-timeout" in body["error"] for body in timed_out)
        assert wait_for(lambda: counter(server, "onnxship_dropped_total", reason="deadline") >= 1)
        admitted = sum(1 for s in statuses if s != 503)
        wait_for(lambda: counter(server, "onnxship_queued_images") == 0)
        assert counter(server, "onnxship_batch_size_count") - calls_before < admitted  # not computed for nobody


def test_a_disconnected_clients_work_is_dropped_before_inference(slow_artifact, tmp_path, jpeg_bytes):
    with running(slow_artifact, tmp_path, *TIGHT, "--max-queued-images", "8") as server:
        with ThreadPoolExecutor(2) as pool:
            busy = [pool.submit(predict, server, jpeg_bytes) for _ in range(2)]  # keeps the worker busy
            assert wait_for(lambda: counter(server, "onnxship_queued_images") >= 1)
            for _ in range(3):
                sock = raw_connection(server)
                sock.sendall((f"POST /predict HTTP/1.1\r\nHost: x\r\nX-API-Key: {API_KEY}\r\n"
                              f"Content-Type: image/jpeg\r\nContent-Length: {len(jpeg_bytes)}\r\n\r\n").encode()
                             + jpeg_bytes)
                time.sleep(0.05)
                sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            assert [f.result(timeout=60).status_code for f in busy] == [200, 200]
        assert wait_for(lambda: counter(server, "onnxship_dropped_total", reason="disconnected") >= 1)
        assert wait_for(lambda: counter(server, "onnxship_client_disconnects_total", stage="waiting") >= 1)
        wait_for(lambda: counter(server, "onnxship_queued_images") == 0)
        assert counter(server, "onnxship_queued_images") == 0  # every slot came back
        assert "Traceback" not in server.log()
