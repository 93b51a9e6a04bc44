"""Every use of LitServe beyond its public `LitAPI` class, in one module, for LitServe 0.2.19 only.

onnxship keeps LitServe's worker model: each inference worker is a spawned process running
LitServe's `inference_worker` (the LitAPI's `setup`, the setup status report, then the worker
loop), and the loop is LitServe's `BatchedLoop`, which calls the LitAPI's decode_request ->
batch -> predict -> unbatch -> encode_response and hands each answer to a `MessageTransport`.
What onnxship replaces around it (serving/handoff.py, serving/supervisor.py): where a batch's
requests come from (a shared-memory slot pool and a socket of small descriptors instead of a
multiprocessing-manager queue), where the answers go (one socket per HTTP process), and who
starts, watches and stops the processes (LitServer.run is not used).

The touch points, each exercised against the pinned LitServe by tests/serving/test_litserve_contract.py:

  T1 version          litserve.__version__ == 0.2.19, checked at import (ImportError otherwise)
  T2 worker entry     litserve.loops.inference_worker(lit_api, device, worker_id, request_queue,
                      transport, workers_setup_status, callback_runner, restart_workers): runs
                      setup, writes f"{endpoint}_{worker_id}" -> "ready"/"error" into the status
                      mapping, then calls lit_api.loop(...) with our queue and transport
  T3 batch collection BatchedLoop.get_batch_requests(lit_api, request_queue, transport) returns
                      ([(consumer_id, uid, payload)], [(consumer_id, uid) timed out]) and
                      raising litserve.loops.base._StopLoopError ends the worker loop
  T4 answers          BatchedLoop.put_response -> transport.send((uid, (data, status,
                      response_type, worker_id)), consumer_id=...) with litserve.utils.LitAPIStatus
                      OK/ERROR; an error is a pickled exception (PickleableHTTPException for an
                      HTTPException); "START" messages are only sent with restart_workers=True
  T5 API preparation  LitServer.__init__ normally calls lit_api.pre_setup() and
                      lit_api.loop.pre_setup(lit_api); `prepare_api` does the same
  T6 worker status    litserve.utils.WorkerSetupStatus values ("starting", "ready", "error")
  T7 hook signatures  the loop calls inspect.signature(lit_api.hook) on every hook call (to see
                      whether it takes `context`); `freeze_hook_signatures` gives each hook of an
                      instance a stored signature (`__signature__`), which inspect returns without
                      rebuilding it
"""

from __future__ import annotations

import inspect
import pickle

import litserve

WRITTEN_FOR = "0.2.19"
if litserve.__version__ != WRITTEN_FOR:  # T1
    raise ImportError(
        f"onnxship's server was written against LitServe {WRITTEN_FOR} internals (serving/litserve_bridge.py) "
        f"but LitServe {litserve.__version__} is installed: pin litserve=={WRITTEN_FOR} "
        "(requirements/serving*.txt) or port serving/litserve_bridge.py and run "
        "tests/serving/test_litserve_contract.py"
    )

from litserve.callbacks import CallbackRunner  # noqa: E402
from litserve.loops import inference_worker  # noqa: E402  (T2)
from litserve.loops.base import _StopLoopError  # noqa: E402  (T3)
from litserve.loops.simple_loops import BatchedLoop  # noqa: E402  (T3, T4)
from litserve.transport.base import MessageTransport  # noqa: E402  (T4)
from litserve.utils import LitAPIStatus, WorkerSetupStatus  # noqa: E402  (T4, T6)

STATUS_STARTING = WorkerSetupStatus.STARTING
STATUS_READY = WorkerSetupStatus.READY
STATUS_ERROR = WorkerSetupStatus.ERROR


class StopWorker(_StopLoopError):
    """Raised by a batch collector to end LitServe's worker loop (the process then exits)."""


class BatchCollector(BatchedLoop):
    """LitServe's batched worker loop with our batch collection: subclasses implement
    `collect(lit_api, inbox, transport) -> list[(consumer_id, uid, payload)]` and raise
    StopWorker to end the loop. Everything after collection (decode_request, batch, predict,
    unbatch, encode_response, one answer per request through the transport) is LitServe's."""

    def collect(self, lit_api, inbox, transport) -> list:
        raise NotImplementedError

    def get_batch_requests(self, lit_api, request_queue, transport):  # T3
        return self.collect(lit_api, request_queue, transport), []


class AnswerTransport(MessageTransport):
    """Where LitServe's worker loop puts each answer (T4). Subclasses implement
    `deliver(consumer_id, uid, ok, data, worker_id)`: `data` is encode_response's output when
    `ok`, else an error message."""

    def deliver(self, consumer_id: int, uid, ok: bool, data, worker_id) -> None:
        raise NotImplementedError

    def send(self, item, consumer_id: int) -> None:
        uid, (data, status, _response_type, worker_id) = item
        if status == LitAPIStatus.OK:
            self.deliver(consumer_id, uid, True, data, worker_id)
        elif status == LitAPIStatus.ERROR:
            self.deliver(consumer_id, uid, False, error_message(data), worker_id)
        # LitAPIStatus.START (only with restart_workers=True) carries nothing for us

    async def areceive(self, timeout=None, consumer_id=None):  # the HTTP side reads sockets itself
        raise NotImplementedError("onnxship HTTP processes read their answer socket directly")


def error_message(data) -> str:
    """LitServe sends a failed batch's exception pickled (or an HTTPException object)."""
    error = data
    if isinstance(data, (bytes, bytearray)):
        try:
            error = pickle.loads(data)
        except Exception:  # noqa: BLE001 - whatever it was, it is an error for the client
            return "inference failed"
    detail = getattr(error, "detail", None)
    return str(detail) if detail else f"{type(error).__name__}: {error}"


class StatusBoard:
    """The mapping LitServe's worker entry writes its setup status into (T2, T6):
    `board[f"{endpoint}_{worker_id}"] = "ready" | "error"`. Backed by shared memory (`codes`, one
    int per worker) so the supervisor and the HTTP processes read it without a manager process."""

    CODES = {STATUS_STARTING: 1, STATUS_READY: 2, STATUS_ERROR: 3}

    def __init__(self, codes):
        self.codes = codes

    def __bool__(self) -> bool:  # inference_worker only reports to a truthy mapping
        return True

    def __setitem__(self, key: str, status) -> None:
        worker = int(str(key).rsplit("_", 1)[1])
        self.codes[worker] = self.CODES.get(getattr(status, "value", status), 0)

    def __reduce__(self):
        return (StatusBoard, (self.codes,))


HOOKS = ("decode_request", "batch", "predict", "unbatch", "encode_response")


def freeze_hook_signatures(lit_api) -> None:
    """T7: LitServe's worker loop rebuilds each hook's signature on every call (10 to 20 us each,
    twice per request plus three times per batch): each hook of this instance becomes a plain
    function carrying the bound method's signature, which inspect returns as it is. Called in the
    worker, after setup (the instance does not pickle afterwards)."""
    for name in HOOKS:
        bound = getattr(lit_api, name)

        def hook(*args, _bound=bound, **kwargs):
            return _bound(*args, **kwargs)

        hook.__signature__ = inspect.signature(bound)
        setattr(lit_api, name, hook)


def prepare_api(lit_api) -> None:
    """What LitServer.__init__ does to a LitAPI before workers start (T5)."""
    lit_api.pre_setup()
    lit_api.loop.pre_setup(lit_api)


def run_inference_worker(lit_api, device: str, worker_id: int, inbox, transport, status_codes) -> None:
    """Body of an inference worker process: LitServe's own worker entry (T2)."""
    inference_worker(lit_api, device, worker_id, inbox, transport, StatusBoard(status_codes), CallbackRunner(), False)


def status_key(lit_api, worker_id: int) -> str:
    """The name LitServe gives a worker in its status mapping ("predict_0"), shown by GET /ready."""
    return f"{lit_api.api_path.split('/')[-1]}_{worker_id}"
