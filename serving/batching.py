"""Batch collection in the inference workers: block for the first request, take what else is
queued, then wait up to `batch_timeout` for more, up to `max_batch_size` images (a 32-image
request is one batch), but only while HTTP processes are decoding images (they will be queued
within milliseconds). With nothing on its way, waiting could only delay the batch: a lone client
(or any load below the batch size's worth of decoding) never pays the timeout.

Each descriptor is checked before any inference work: a stale one (its slot was reallocated: the
message of a dead HTTP process) is skipped; one whose client is gone or whose deadline passed is
answered "dropped" at once, so an overloaded server never computes for nobody. The worker writes
its id into the request's `taken` slot entry first, so that if this process dies the supervisor's
notice fails exactly the requests it held. Everything after collection (predict, unbatch, encode,
one answer per request) is LitServe's BatchedLoop (serving/litserve_bridge.py).
"""

from __future__ import annotations

import time

from serving.handoff import DROPPED, MODE_STOP, MODE_TOP, Descriptor, answer_records
from serving.litserve_bridge import AnswerTransport, BatchCollector, StopWorker
from serving.metrics import metrics

IDLE_WAIT_S = 1.0  # a blocked worker wakes this often (to notice a dead supervisor); costs nothing while idle
# while filling a batch, how often a worker with nothing queued looks again at what is on its way
# (an upload that fails to decode never arrives: the worker notices within this)
ON_THE_WAY_CHECK_S = 0.001


class InferenceRequest:
    """One request's images (rows of the shared slot pool, or an array) and the answer it wants."""

    __slots__ = ("slots", "pool", "_images", "mode", "k", "queue_wait", "picked_at")

    def __init__(self, images=None, mode: str = "class", k: int = 1, slots=(), pool=None, queue_wait: float = 0.0,
                 picked_at: float = 0.0):
        self._images, self.slots, self.pool = images, tuple(slots), pool
        self.mode, self.k, self.queue_wait, self.picked_at = mode, k, queue_wait, picked_at

    @property
    def images(self):
        if self._images is None:
            self._images = self.pool[list(self.slots)]
        return self._images

    @property
    def count(self) -> int:
        return len(self.slots) if self._images is None else int(self._images.shape[0])


class EncodedAnswer:
    """A request's result as sent back: class ids and confidences, [n, k] each, plus timings."""

    __slots__ = ("ids", "confidences", "batch", "queue_wait", "infer", "span")

    def __init__(self, ids, confidences, batch: int, queue_wait: float, infer: float, span: float):
        self.ids, self.confidences = ids, confidences
        self.batch, self.queue_wait, self.infer, self.span = batch, queue_wait, infer, span


class Answers(AnswerTransport):
    """LitServe's transport for answers: one record (or a few fragments) on the HTTP process's socket."""

    def __init__(self, side):
        self.side = side

    def __reduce__(self):
        return (Answers, (self.side,))

    def deliver(self, consumer_id: int, uid, ok: bool, data, worker_id) -> None:
        req_id, seq = uid
        worker = int(worker_id or 0)
        if ok:
            n, k = data.ids.shape
            payload = data.ids.astype("<i4").tobytes() + data.confidences.astype("<f4").tobytes()
            records = answer_records(req_id, seq, 0, worker, k, n, payload, data.batch, data.queue_wait, data.infer,
                                     data.span)
        else:
            records = answer_records(req_id, seq, 1, worker, 0, 0, str(data).encode("utf-8", "replace")[:2000])
        self.side.answer(consumer_id, records)

    def dropped(self, descriptor: Descriptor, worker: int) -> None:
        self.side.answer(descriptor.server, answer_records(descriptor.req_id, descriptor.seq, DROPPED, worker, 0, 0))


class GreedyBatchLoop(BatchCollector):
    def __init__(self):
        super().__init__()
        self.stopping = False

    def collect(self, lit_api, inbox, transport) -> list:
        if self.stopping:
            raise StopWorker()
        item = inbox.receive(IDLE_WAIT_S)
        if item is None:
            if inbox.parent_gone():  # the supervisor was killed: do not outlive it
                raise StopWorker()
            return []
        worker = self.worker_id or 0
        payloads, images = [], 0
        deadline = time.monotonic() + lit_api.batch_timeout
        while item is not None:
            if item.mode == MODE_STOP:
                self.stopping = True
                break
            request = self.admit(item, inbox, transport, worker)
            if request is not None:
                payloads.append((item.server, (item.req_id, item.seq), request))
                images += request.count
                if images >= lit_api.max_batch_size:
                    break
            item = inbox.receive(0.0)
            if item is None:
                item = self.wait_for_more(inbox, deadline)
        return payloads

    @staticmethod
    def wait_for_more(inbox, deadline: float) -> Descriptor | None:
        """The next descriptor if one comes before `deadline` while images are on their way; None
        as soon as nothing is."""
        while inbox.images_on_the_way() > 0:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            item = inbox.receive(min(remaining, ON_THE_WAY_CHECK_S))
            if item is not None:
                return item
        return None

    @staticmethod
    def admit(item: Descriptor, inbox, transport: Answers, worker: int) -> InferenceRequest | None:
        slot = item.slots[0]
        if inbox.slot_seq[slot] != item.seq:
            return None  # reallocated since: a message of a process that is gone
        inbox.slot_taken[slot] = worker
        now = time.monotonic()
        if inbox.slot_cancel[slot] or now > item.deadline:
            metrics().dropped.labels(reason="disconnected" if inbox.slot_cancel[slot] else "deadline").inc()
            transport.dropped(item, worker)
            return None
        return InferenceRequest(mode="top" if item.mode == MODE_TOP else "class", k=item.k, slots=item.slots,
                                pool=inbox.images, queue_wait=now - item.sent_at, picked_at=now)
