"""Graceful drain against a real server: SIGTERM to the main process or SIGINT to the whole process
group (docker stop, Ctrl-C, a platform's scale-down): /ready turns 503 at once, new connections are
refused after the grace, every accepted request is answered, exit status 0."""

from __future__ import annotations

import os
import signal
import socket
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.serving.conftest import running
from tests.serving.test_holes import wait_for
from tests.serving.test_overload import counter, predict
from tests.serving.test_supervision import processes

DRAINING = ("--workers", "1", "--api-servers", "2", "--max-batch-size", "1", "--intra-op-threads", "1",
            "--max-queued-images", "64", "--drain-grace", "2", "--drain-timeout", "60")


def refused(server) -> bool:
    host, port = server.url.removeprefix("http://").split(":")
    try:
        socket.create_connection((host, int(port)), timeout=2).close()
    except ConnectionRefusedError:
        return True
    except OSError:
        return False
    return False


@pytest.mark.parametrize("how", ["SIGTERM to the main process", "SIGINT to the process group"])
def test_drain_answers_every_accepted_request(slower_artifact, tmp_path, jpeg_bytes, how):
    with running(slower_artifact, tmp_path, *DRAINING) as server:
        with ThreadPoolExecutor(9) as pool:
            accepted = [pool.submit(predict, server, jpeg_bytes) for _ in range(8)]
            assert wait_for(lambda: counter(server, "onnxship_queued_images") >= 8, timeout=60)  # all admitted
            if how.startswith("SIGTERM"):
                os.kill(server.process.pid, signal.SIGTERM)
            else:
                os.killpg(server.process.pid, signal.SIGINT)
            draining = wait_for(lambda: requests.get(f"{server.url}/ready", timeout=10).json()["status"] == "draining")
            assert draining and requests.get(f"{server.url}/ready", timeout=10).status_code == 503
            during_grace = predict(server, jpeg_bytes)  # /ready says 503, but what still arrives is served
            assert wait_for(lambda: refused(server), timeout=30)  # after --drain-grace: no new connections
            answers = [future.result(timeout=120) for future in accepted]
        assert [a.status_code for a in answers] == [200] * 8, [a.text for a in answers]
        assert during_grace.status_code == 200, during_grace.text
        assert server.process.wait(60) == 0, server.log()
        assert "received: draining" in server.log() and "drained: every accepted request was answered" in server.log()
        assert processes(server, "onnxship-") == []
