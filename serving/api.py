"""The LitAPI: the model-specific part of the server, and nothing else.

    setup            load the artifact into an ONNX Runtime session (one copy per worker)
    decode_request   nothing left to do: the HTTP process already validated and decoded the
                     images (serving/server.py), so a bad upload never reaches a batch
    batch            concatenate the images of every request in the batch
    predict          one ONNX Runtime call for the whole batch
    unbatch          split the probabilities back per request, formatted for its mode
    encode_response  the per-image results (the HTTP process adds processing_time)

One class serves /predict, /predict/top and multi-image requests: each payload says what it
wants (`mode`, `k`), so all of them share one model copy and one batch queue per worker.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import litserve as ls
import numpy as np

from serving.batching import GreedyBatchLoop
from serving.metrics import metrics
from serving.runtime import Classifier, top_k

log = logging.getLogger(__name__)

MODES = ("class", "top")


@dataclass(frozen=True)
class InferenceRequest:
    """What the HTTP process puts on the batch queue: decoded images and the answer wanted."""

    images: np.ndarray  # uint8 [n, H, W, 3]
    mode: str = "class"  # "class": best class; "top": the k best
    k: int = 1

    @property
    def count(self) -> int:
        return int(self.images.shape[0])


class ClassifierAPI(ls.LitAPI):
    def __init__(
        self,
        model_path: str | Path,
        device: str = "auto",
        intra_op_threads: int | None = None,
        tensorrt: bool = False,
        max_batch_size: int = 4,
        batch_timeout: float = 0.0,
        state_dir: str | Path | None = None,
    ):
        super().__init__(
            max_batch_size=max_batch_size, batch_timeout=batch_timeout, api_path="/predict", loop=GreedyBatchLoop()
        )
        self.model_path = str(model_path)
        self.requested_device = device
        self.intra_op_threads = intra_op_threads
        self.tensorrt = tensorrt
        self.state_dir = str(state_dir) if state_dir else None
        self.classifier: Classifier | None = None

    def setup(self, device: str) -> None:
        device_id = int(device.split(":")[1]) if device.startswith("cuda:") else 0
        self.classifier = Classifier(
            self.model_path,
            device=self.requested_device,
            intra_op_threads=self.intra_op_threads,
            device_id=device_id,
            tensorrt=self.tensorrt,
        )
        size = self.classifier.metadata.input_size
        self.classifier.predict(np.zeros((1, size, size, 3), np.uint8))  # warm up before reporting ready
        self._report_worker(device)

    def _report_worker(self, litserve_device: str) -> None:
        """Leave a note for GET /model: what this worker really runs on."""
        if not self.state_dir:
            return
        worker_id = os.environ.get("LITSERVE_WORKER_ID", "0")
        note = {"worker": int(worker_id), "pid": os.getpid(), "litserve_device": litserve_device,
                **self.classifier.describe()}
        path = Path(self.state_dir) / f"worker-{worker_id}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(note))
        tmp.replace(path)

    def decode_request(self, request: InferenceRequest) -> InferenceRequest:
        return request

    def batch(self, inputs: list[InferenceRequest]) -> list[InferenceRequest]:
        return inputs

    def predict(self, requests: list[InferenceRequest]) -> list[list[dict]]:
        images = requests[0].images if len(requests) == 1 else np.concatenate([r.images for r in requests])
        start = time.perf_counter()
        probabilities = self.classifier.predict(images)
        m = metrics()
        m.inference_duration.observe(time.perf_counter() - start)
        m.batch_size.observe(images.shape[0])
        labels = self.classifier.labels
        results, offset = [], 0
        for request in requests:
            rows = probabilities[offset : offset + request.count]
            offset += request.count
            if request.mode == "top":
                results.append([
                    {"predictions": [{"class_id": c, "confidence": p, "label": labels[c]}
                                     for c, p in top_k(row, request.k)]}
                    for row in rows
                ])
            else:
                best = rows.argmax(axis=1)
                results.append([
                    {"class_id": int(c), "confidence": float(row[c]), "label": labels[int(c)]}
                    for c, row in zip(best, rows)
                ])
        return results

    def unbatch(self, output: list[list[dict]]) -> list[list[dict]]:
        return output

    def encode_response(self, output: list[dict]) -> list[dict]:
        return output
