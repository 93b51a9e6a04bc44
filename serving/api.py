"""The LitAPI: the model-specific part of the server, and nothing else.

    setup            load the artifact into an ONNX Runtime session (one copy per worker), warm it up
    decode_request   nothing left to do: the HTTP process already validated and decoded the images
                     into shared memory (serving/handoff.py), so a bad upload never reaches a batch
    batch            the requests of the batch, as they are
    predict          one ONNX Runtime call for every image of the batch (one copy out of the slot
                     pool), then per request the best class or the k best: class ids + confidences
    unbatch          one result per request
    encode_response  ids, confidences and timings (the HTTP process adds labels and formats JSON,
                     so the worker's CPU goes to inference)

One class serves /predict, /predict/top and multi-image requests: each request says what it
wants (`mode`, `k`), so all of them share one model copy and one batch queue per worker.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import litserve as ls
import numpy as np

from serving.batching import EncodedAnswer, GreedyBatchLoop, InferenceRequest
from serving.litserve_bridge import freeze_hook_signatures
from serving.metrics import metrics
from serving.providers import GpuSettings
from serving.runtime import Classifier, top_k

log = logging.getLogger(__name__)

__all__ = ["ClassifierAPI", "InferenceRequest", "gather", "best_classes"]


def gather(requests: list[InferenceRequest]) -> np.ndarray:
    """All images of the batch in one uint8 array: one copy out of shared memory."""
    if len(requests) == 1:
        return requests[0].images
    if all(r.pool is not None and r._images is None for r in requests):
        slots = [slot for r in requests for slot in r.slots]
        return requests[0].pool[slots]
    return np.concatenate([r.images for r in requests])


def best_classes(rows: np.ndarray, mode: str, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Class ids and confidences, [n, k] each ([n, 1] for mode "class"), most likely first."""
    if mode != "top":
        ids = rows.argmax(axis=1)[:, None]
        return ids.astype(np.int32), np.take_along_axis(rows, ids, axis=1).astype(np.float32)
    pairs = [top_k(row, k) for row in rows]
    ids = np.array([[c for c, _ in p] for p in pairs], np.int32)
    confidences = np.array([[p for _, p in pair] for pair in pairs], np.float32)
    return ids, confidences


class ClassifierAPI(ls.LitAPI):
    def __init__(
        self,
        model_path: str | Path,
        device: str = "auto",
        intra_op_threads: int | None = None,
        gpu: GpuSettings | None = None,
        max_batch_size: int = 4,
        batch_timeout: float = 0.0,
        state_dir: str | Path | None = None,
        spinning: str | None = None,
    ):
        super().__init__(
            max_batch_size=max_batch_size, batch_timeout=batch_timeout, api_path="/predict", loop=GreedyBatchLoop()
        )
        self.model_path = str(model_path)
        self.requested_device = device
        self.intra_op_threads = intra_op_threads
        self.gpu = gpu
        self.spinning = spinning
        self.state_dir = str(state_dir) if state_dir else None
        self.classifier: Classifier | None = None

    def setup(self, device: str) -> None:
        device_id = int(device.split(":")[1]) if device.startswith("cuda:") else 0
        start = time.perf_counter()
        self.classifier = Classifier(
            self.model_path,
            device=self.requested_device,
            intra_op_threads=self.intra_op_threads,
            device_id=device_id,
            gpu=self.gpu,
            spinning=self.spinning,
        )
        built = time.perf_counter()
        size = self.classifier.metadata.input_size
        for batch in sorted({1, self.max_batch_size}):  # warm up before reporting ready
            self.classifier.predict(np.zeros((batch, size, size, 3), np.uint8))
        timings = {"session_build_s": round(built - start, 3), "warmup_s": round(time.perf_counter() - built, 3),
                   "ready_monotonic": time.monotonic()}  # CLOCK_MONOTONIC: one clock for every process
        log.info("model loaded in %.2f s, warmed up in %.2f s", timings["session_build_s"], timings["warmup_s"])
        freeze_hook_signatures(self)
        self._report_worker(device, timings)

    def _report_worker(self, litserve_device: str, timings: dict) -> None:
        """Leave a note for GET /model: what this worker really runs on, and how long it took to load."""
        if not self.state_dir:
            return
        worker_id = os.environ.get("LITSERVE_WORKER_ID", "0")
        note = {"worker": int(worker_id), "pid": os.getpid(), "litserve_device": litserve_device,
                **self.classifier.describe(), **timings}
        path = Path(self.state_dir) / f"worker-{worker_id}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(note))
        tmp.replace(path)

    def decode_request(self, request: InferenceRequest) -> InferenceRequest:
        return request

    def batch(self, inputs: list[InferenceRequest]) -> list[InferenceRequest]:
        return inputs

    def predict(self, requests: list[InferenceRequest]) -> list[EncodedAnswer]:
        images = gather(requests)
        start = time.perf_counter()
        probabilities = self.classifier.predict(images)
        infer = time.perf_counter() - start
        m = metrics()
        m.inference_duration.observe(infer)
        m.batch_size.observe(images.shape[0])
        results, offset, now = [], 0, time.monotonic()
        for request in requests:
            rows = probabilities[offset: offset + request.count]
            offset += request.count
            ids, confidences = best_classes(rows, request.mode, request.k)
            m.queue_wait.observe(request.queue_wait)
            results.append(EncodedAnswer(ids, confidences, int(images.shape[0]), request.queue_wait, infer,
                                         now - request.picked_at if request.picked_at else 0.0))
        return results

    def unbatch(self, output: list[EncodedAnswer]) -> list[EncodedAnswer]:
        return output

    def encode_response(self, output: EncodedAnswer) -> EncodedAnswer:
        return output
