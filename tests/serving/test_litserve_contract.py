"""The contract between onnxship and the LitServe (and uvicorn) internals it relies on.

serving/litserve_bridge.py lists every LitServe touch point (T1..T7); each test here exercises one
against the pinned LitServe, so that an upgrade fails here with a message naming what changed,
instead of a server that hangs or answers 500 in production. The uvicorn touch points of
serving/httpserver.py are checked the same way.
"""

from __future__ import annotations

import inspect
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import litserve as ls
from serving import litserve_bridge as bridge
from serving.handoff import W_ERROR, W_READY
from tests.serving.conftest import REPO_ROOT

WHERE = "(see serving/litserve_bridge.py)"


def test_t1_the_bridge_refuses_another_litserve_version():
    assert ls.__version__ == bridge.WRITTEN_FOR, f"LitServe {ls.__version__} installed, bridge written for " \
        f"{bridge.WRITTEN_FOR}: port serving/litserve_bridge.py, then update WRITTEN_FOR"
    probe = textwrap.dedent("""
        import litserve
        litserve.__version__ = "9.9.9"
        try:
            import serving.litserve_bridge
        except ImportError as error:
            print(error)
    """)
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert "written against LitServe 0.2.19" in result.stdout and "9.9.9 is installed" in result.stdout, result


def test_t2_worker_entry_signature():
    expected = ["lit_api", "device", "worker_id", "request_queue", "transport", "workers_setup_status",
                "callback_runner", "restart_workers"]
    found = list(inspect.signature(bridge.inference_worker).parameters)
    assert found == expected, f"litserve.loops.inference_worker parameters changed: {found} (T2 {WHERE})"


def test_t3_t4_batch_loop_hooks_and_answer_messages():
    found = list(inspect.signature(bridge.BatchedLoop.get_batch_requests).parameters)
    assert found == ["self", "lit_api", "request_queue", "transport"], \
        f"BatchedLoop.get_batch_requests parameters changed: {found} (T3 {WHERE})"
    assert issubclass(bridge.StopWorker, bridge._StopLoopError)
    found = list(inspect.signature(bridge.BatchedLoop.put_response).parameters)
    assert found == ["self", "transport", "response_queue_id", "uid", "response_data", "status", "response_type"], \
        f"LitLoop.put_response parameters changed: {found} (T4 {WHERE})"
    assert {bridge.LitAPIStatus.OK, bridge.LitAPIStatus.ERROR} == {"OK", "ERROR"}


class Inbox:
    """Requests for one batch, then the end of the loop."""

    def __init__(self, payloads):
        self.payloads = payloads


class Collector(bridge.BatchCollector):
    def collect(self, lit_api, inbox, transport):
        if inbox.payloads is None:
            raise bridge.StopWorker()
        payloads, inbox.payloads = inbox.payloads, None
        return payloads


class Transport(bridge.AnswerTransport):
    def __init__(self):
        self.answers = []

    def deliver(self, consumer_id, uid, ok, data, worker_id):
        self.answers.append((consumer_id, uid, ok, data, worker_id))


class Doubler(ls.LitAPI):
    def __init__(self, fail=None):
        super().__init__(max_batch_size=4, api_path="/predict", loop=Collector())
        self.fail = fail

    def setup(self, device):
        self.ready = device
        bridge.freeze_hook_signatures(self)

    def predict(self, xs):
        if self.fail:
            raise self.fail
        return [x * 2 for x in xs]



def run_worker(api) -> tuple[list, list]:
    bridge.prepare_api(api)  # T5
    codes = [0]
    transport = Transport()
    inbox = Inbox([(1, "a", 10), (2, "b", 20)])
    bridge.run_inference_worker(api, "cpu", 0, inbox, transport, codes)  # returns once the loop stops (T3)
    return codes, transport.answers


def test_t2_t4_t5_t6_a_worker_runs_setup_reports_ready_and_answers_each_request():
    codes, answers = run_worker(Doubler())
    assert codes == [bridge.StatusBoard.CODES[bridge.STATUS_READY]] == [W_READY], \
        f"the worker did not report 'ready' into the status mapping as {bridge.status_key(Doubler(), 0)!r} (T2, T6)"
    assert [(c, uid, ok, data) for c, uid, ok, data, _ in answers] == [(1, "a", True, 20), (2, "b", True, 40)], \
        f"answers no longer reach the transport as (uid, (data, status, type, worker_id)): {answers} (T4 {WHERE})"


@pytest.mark.parametrize("error, words", [(ValueError("boom"), "boom"),
                                          (__import__("fastapi").HTTPException(418, "teapot"), "teapot")])
def test_t4_a_failed_batch_answers_every_request_with_its_error(error, words):
    _, answers = run_worker(Doubler(fail=error))
    assert [(uid, ok) for _, uid, ok, _, _ in answers] == [("a", False), ("b", False)], answers
    assert all(words in data for _, _, _, data, _ in answers), answers


def test_t2_t6_a_failed_setup_is_reported_as_error():
    class Broken(Doubler):
        def setup(self, device):
            raise RuntimeError("no model")

    api = Broken()
    bridge.prepare_api(api)
    codes = [0]
    bridge.run_inference_worker(api, "cpu", 0, Inbox([]), Transport(), codes)
    assert codes == [W_ERROR], f"a failed setup no longer writes 'error' into the status mapping (T2, T6 {WHERE})"
    assert (bridge.STATUS_STARTING, bridge.STATUS_READY, bridge.STATUS_ERROR) == ("starting", "ready", "error")


def test_t7_the_loop_reads_hook_signatures_and_gets_the_frozen_ones():
    from litserve.loops import base

    assert "inspect.signature(func)" in inspect.getsource(base._inject_context), \
        f"LitServe's _inject_context no longer inspects hook signatures: freeze_hook_signatures is useless (T7 {WHERE})"
    api = Doubler()
    api.setup("cpu")
    assert inspect.signature(api.predict) is api.predict.__signature__  # computed once, returned as is
    assert list(inspect.signature(api.predict).parameters) == ["xs"]  # bound: `self` dropped as before
    assert api.predict([1, 2]) == [2, 4]


def test_the_classifier_api_passes_through_litserves_loop(default_artifact):
    """ClassifierAPI + GreedyBatchLoop in LitServe's real worker loop, in-process."""
    from serving.api import ClassifierAPI
    from serving.batching import InferenceRequest

    api = ClassifierAPI(default_artifact, device="cpu", intra_op_threads=1, max_batch_size=4)
    images = np.zeros((2, 224, 224, 3), np.uint8)

    api.loop = Collector()
    bridge.prepare_api(api)
    transport = Transport()
    requests_ = [(0, (7, 1), InferenceRequest(images, "top", 3)), (1, (8, 1), InferenceRequest(images[:1]))]
    bridge.run_inference_worker(api, "cpu", 0, Inbox(requests_), transport, [0])
    (c0, uid0, ok0, top, _), (c1, uid1, ok1, best, _) = transport.answers
    assert (c0, uid0, ok0, c1, uid1, ok1) == (0, (7, 1), True, 1, (8, 1), True)
    assert top.ids.shape == (2, 3) and best.ids.shape == (1, 1) and top.ids[0, 0] == best.ids[0, 0]


def test_uvicorn_internals_used_by_the_http_processes():
    import uvicorn
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

    assert uvicorn.__version__ == "0.54.0", f"uvicorn {uvicorn.__version__}: re-check serving/httpserver.py"
    for name in ("connection_made", "connection_lost", "on_message_begin", "on_headers_complete", "on_body",
                 "on_message_complete", "on_response_complete", "shutdown"):
        assert callable(getattr(HttpToolsProtocol, name, None)), f"HttpToolsProtocol.{name} is gone"
    source = inspect.getsource(RequestResponseCycle.__init__)
    assert "self.response_started" in source and "self.response_complete" in source
    assert "self.loop" in inspect.getsource(HttpToolsProtocol.__init__)
    # the prediction routes' path (serving/httpserver.py, PredictionCycle): what it reads and what it must provide
    assert all(f"self.{name}" in inspect.getsource(HttpToolsProtocol) for name in
               ("url", "headers", "expect_100_continue", "server_state", "parser", "cycle", "flow"))
    assert "self.headers.append((name, value))" in inspect.getsource(HttpToolsProtocol.on_header)
    assert "default_headers" in inspect.getsource(HttpToolsProtocol.on_headers_complete)
    cycle_uses = inspect.getsource(HttpToolsProtocol.connection_lost) + inspect.getsource(HttpToolsProtocol.shutdown)
    assert set(re.findall(r"self\.cycle\.(\w+)", cycle_uses)) <= {"response_complete", "disconnected",
                                                                   "message_event", "keep_alive"}
    assert "capture_signals" in inspect.getsource(uvicorn.Server.serve)
    assert hasattr(uvicorn.Server(uvicorn.Config(app=lambda *a: None)), "should_exit")
