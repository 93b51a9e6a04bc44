"""Supervision against a real server: kill -9 of an inference worker or of an HTTP process never
leaves a request hanging, the process is respawned and service is restored; respawning that keeps
failing ends the server with a non-zero status so that the platform restarts it."""

from __future__ import annotations

import os
import shutil
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

from tests.serving.conftest import running, stop
from tests.serving.test_holes import wait_for
from tests.serving.test_overload import counter, predict


def processes(server, prefix: str) -> list[int]:
    """PIDs of the server's processes whose name (/proc/<pid>/comm) starts with `prefix`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            comm = stat[stat.index("(") + 1: stat.rindex(")")]
            pgrp = int(stat.rsplit(")", 1)[1].split()[2])
        except (OSError, ValueError, IndexError):
            continue
        if pgrp == server.process.pid and comm.startswith(prefix) and stat.rsplit(")", 1)[1].split()[0] != "Z":
            found.append(int(entry.name))
    return sorted(found)


def ready_status(server) -> tuple[int, str]:
    response = requests.get(f"{server.url}/ready", timeout=10)
    return response.status_code, response.json()["status"]


def answers_ready(server) -> bool:
    try:
        return requests.get(f"{server.url}/ready", timeout=10).status_code == 200
    except requests.ConnectionError:  # not listening yet
        return False


def load_while(server, data: bytes, action, clients: int = 4) -> list:
    """Requests from `clients` threads before, during and after `action()`; every outcome."""
    stop_event, outcomes = threading.Event(), []

    def client():
        while not stop_event.is_set():
            try:
                response = predict(server, data, timeout=60)
                outcomes.append((response.status_code, response.json().get("error", "")))
            except requests.ConnectionError as error:  # reset by a dying HTTP process: fast, not a hang
                outcomes.append(("reset", str(error)))

    with ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(client) for _ in range(clients)]
        try:
            action()
        finally:
            stop_event.set()
            for future in futures:
                future.result(timeout=120)  # a hung request would fail here
    return outcomes


def test_killed_worker_fails_its_requests_fast_and_is_respawned(slow_artifact, tmp_path, jpeg_bytes):
    with running(slow_artifact, tmp_path, "--workers", "2", "--api-servers", "1", "--max-batch-size", "1",
                 "--intra-op-threads", "1", "--max-queued-images", "8") as server:
        workers = processes(server, "onnxship-work")
        assert len(workers) == 2
        seen = {}

        def kill_one():
            assert wait_for(lambda: counter(server, "onnxship_queued_images") >= 2)
            statuses, watching = [], threading.Event()

            def watch_ready():  # from before the kill, so the ~1 s degraded window cannot be missed
                while not watching.is_set():
                    try:
                        statuses.append(ready_status(server)[1])
                    except requests.RequestException as error:
                        statuses.append(f"error: {error}")
                    watching.wait(0.02)

            watcher = threading.Thread(target=watch_ready)
            watcher.start()
            try:
                os.kill(workers[0], signal.SIGKILL)
                seen["restored"] = wait_for(lambda: "degraded" in statuses and statuses[-1] == "ready", timeout=120)
            finally:
                watching.set()
                watcher.join()
            seen["statuses"] = sorted(set(statuses))

        outcomes = load_while(server, jpeg_bytes, kill_one)
        assert {status for status, _ in outcomes} <= {200, 503}, outcomes
        died = [error for status, error in outcomes if status == 503]
        assert all("died" in error or "capacity" in error for error in died), died
        assert seen["restored"] and seen["statuses"] == ["degraded", "ready"], seen
        assert [predict(server, jpeg_bytes).status_code for _ in range(3)] == [200, 200, 200]  # served again
        assert counter(server, "onnxship_process_restarts_total", kind="worker") == 1
        new_workers = processes(server, "onnxship-work")
        assert len(new_workers) == 2 and workers[0] not in new_workers
        assert "restarting it" in server.log()


def test_killed_http_process_is_respawned_and_nothing_hangs(null_artifact, tmp_path, jpeg_bytes):
    with running(null_artifact, tmp_path, "--workers", "1", "--api-servers", "2") as server:
        https = processes(server, "onnxship-http")
        assert len(https) == 2

        def kill_one():
            os.kill(https[0], signal.SIGKILL)
            assert wait_for(lambda: len(processes(server, "onnxship-http")) == 2
                            and https[0] not in processes(server, "onnxship-http"), timeout=60)

        outcomes = load_while(server, jpeg_bytes, kill_one)
        assert {status for status, _ in outcomes} <= {200, "reset"}, outcomes
        assert all(predict(server, jpeg_bytes).status_code == 200 for _ in range(6))
        assert counter(server, "onnxship_process_restarts_total", kind="http") == 1
        assert ready_status(server) == (200, "ready")


def test_server_exits_nonzero_when_respawning_keeps_failing(default_artifact, tmp_path):
    """Killed the moment /ready first answers 200 (possibly before the supervisor's next look marked
    the start complete): the worker had loaded the model, so its failing respawns are restarts that
    end in "giving up", never a start-up failure."""
    model = tmp_path / "model.onnx"
    shutil.copy(default_artifact, model)
    with running(model, tmp_path, "--workers", "1", ready=False) as server:
        assert wait_for(lambda: answers_ready(server), timeout=120, interval=0.005), server.log()
        model.unlink()  # a respawned worker can no longer load the model
        os.kill(processes(server, "onnxship-work")[0], signal.SIGKILL)
        server.process.wait(120)
        assert server.process.returncode == 1, server.log()
        assert "giving up" in server.log() and "restarts in a row" in server.log()
        assert processes(server, "onnxship-") == []
        assert stop(server.process) == 1
