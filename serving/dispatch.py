"""The HTTP process's side of the hand-off (serving/handoff.py): admission, slots, answers.

Admission control is the slot pool itself: this process may hold at most `limit` images between
taking slots and receiving their answers. `limit` starts at its partition of --max-queued-images
(workers x max batch x QUEUE_BATCHES) and adapts to the allowed queueing time (--max-queue-wait):
when answers report a queue wait above it, the limit shrinks (multiplicatively, at most once per
allowed queueing time); while they wait less than half of it, it grows back by one per answer. So
a slow model or a busy machine queues seconds less, and a fast one keeps its full bound. A request
is refused with a fast 503 (`Refused`) when no inference worker is ready or when its images do not
fit (a request alone in this process always fits, up to its partition): the check runs before the body is read, and again (exactly)
once the image count is known, before any decoding. From taking its slots until the hand-off a
request's images count as `decoding` in shared memory: what a worker filling a batch waits for.

Answers arrive on this process's own socket, read with `loop.add_reader` (no thread hop per
answer): each settles its request through the request's callback (no future, no task). A request
waits for its answer until its deadline (--request-timeout, a loop timer) or until its client
disconnects (`abandon`); either way it is marked cancelled
in shared memory, so a worker that has not started it yet drops it before inference, and its
slots come back when the worker's "dropped" arrives. A supervisor notice "worker w died" fails
exactly the requests worker w had taken (fast 503, never a hang) and frees their slots.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass

import numpy as np

from serving.handoff import (ANSWER, DROPPED, ERROR, MODE_CLASS, MODE_TOP, OK, RECEIVE_BYTES, SHUTDOWN,
                             WORKER_DEAD, Descriptor, SharedState)
from serving.metrics import metrics

log = logging.getLogger(__name__)

ORPHAN_S = 30.0  # an abandoned request whose answer never came (lost with a killed worker): slots come back
SWEEP_S = 5.0


class Refused(Exception):
    """503 before any work: reason is no_worker or queue_full."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason, self.message = reason, message


class WorkerDied(Exception):
    pass


class DeadlineExceeded(Exception):
    pass


class InferenceFailed(Exception):
    pass


@dataclass
class Answer:
    ids: np.ndarray  # [n, k] class ids, most likely first
    confidences: np.ndarray  # [n, k]
    queue_wait: float
    infer: float
    batch: int


class Pending:
    """A request handed to a worker, until its answer (or "dropped") brings its slots back.
    `settle` is called once: with the Answer, or with the exception that ends the request."""

    __slots__ = ("settle", "slots", "seq", "sent_at", "parts", "abandoned_at", "settled", "timer")

    def __init__(self, settle, slots, seq, sent_at):
        self.settle, self.slots, self.seq, self.sent_at = settle, slots, seq, sent_at
        self.parts: list[bytes] = []
        self.abandoned_at: float | None = None
        self.settled = False
        self.timer = None

    def finish(self, outcome) -> None:
        if self.settled:
            return
        self.settled = True
        if self.timer is not None:
            self.timer.cancel()
        self.settle(outcome)


class Dispatcher:
    def __init__(self, state: SharedState, server: int, max_queue_wait: float = 1.0):
        self.state, self.server = state, server
        self.free = list(reversed(state.partition(server)))  # pop() takes the lowest: few pages touched when idle
        self.limit = self.limit_max = state.slots_per_server
        self.max_queue_wait = max_queue_wait
        self.shrunk_at = 0.0
        self.held = 0
        self.pending: dict[int, Pending] = {}
        self.next_id = (os.getpid() & 0x3FFFFF) << 40
        self.sock = state.answer_recv[server]
        state.decoding[server] = 0  # (a respawned process: what its predecessor was decoding is gone)
        self.buffer = bytearray(RECEIVE_BYTES)
        self.on_shutdown = None  # set by the HTTP server: called on the supervisor's "shut down"
        self.loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.sock.setblocking(False)
        self.loop.add_reader(self.sock.fileno(), self._on_readable)
        self.loop.call_later(SWEEP_S, self._sweep)

    def stop(self) -> None:
        if self.loop is not None:
            self.loop.remove_reader(self.sock.fileno())

    # ------------------------------------------------------------ admission and slots

    def refusal(self, images: int = 1) -> Refused | None:
        # (a draining server still serves what reaches it: /ready already says 503, and after
        # --drain-grace no new connection is accepted at all)
        if self.state.ready_workers() == 0:
            return Refused("no_worker", "no inference worker is ready (starting or restarting): retry shortly")
        if self.held and self.held + images > self.limit:
            return Refused("queue_full", f"server at capacity ({self.held} images queued or in flight here, "
                           f"limit {self.limit}): retry after the Retry-After delay")
        return None

    def acquire(self, images: int) -> list[int]:
        refused = self.refusal(images)
        if refused is not None:
            raise refused
        if images > len(self.free):
            raise Refused("queue_full", f"server at capacity ({self.held} images queued or in flight here): "
                          "retry after the Retry-After delay")
        slots = [self.free.pop() for _ in range(images)]
        self.held += images
        self.state.decoding[self.server] += images
        metrics().queued.set(self.held)
        return slots

    def release(self, slots: list[int], handed_off: bool = True) -> None:
        """Free `slots`: answered, dropped or failed after the hand-off, or never handed off
        (`handed_off=False`: the upload failed to decode)."""
        if not handed_off:
            self.state.decoding[self.server] -= len(slots)
        self.free.extend(slots)
        self.held -= len(slots)
        metrics().queued.set(self.held)

    def views(self, slots: list[int]) -> list[np.ndarray]:
        images = self.state.images
        return [images[slot] for slot in slots]

    # ------------------------------------------------------------ one request

    def submit(self, slots: list[int], mode: str, k: int, deadline: float, settle) -> Pending:
        """Hand the decoded slots to a worker. `settle(outcome)` is called once, from the event
        loop: with the Answer, or with DeadlineExceeded (at `deadline`, or the worker dropped it),
        WorkerDied or InferenceFailed. The slots are ours again once settled, except after a
        deadline or `abandon`: then when the worker says so. Raises Refused if the request queue
        is full (the slots are released)."""
        state, slot = self.state, slots[0]
        state.slot_seq[slot] += 1
        seq = state.slot_seq[slot]
        state.slot_cancel[slot] = 0
        state.slot_taken[slot] = -1
        self.next_id += 1
        req_id = self.next_id
        now = time.monotonic()
        message = Descriptor(req_id, self.server, seq, MODE_TOP if mode == "top" else MODE_CLASS, k, tuple(slots),
                             now, deadline).pack()
        # no longer on their way before the descriptor is: a worker never waits for a request it already has
        state.decoding[self.server] -= len(slots)
        try:
            state.request_send.send(message)
        except BlockingIOError:
            self.release(slots)
            raise Refused("queue_full", "server at capacity (request queue full): retry after the Retry-After delay")
        except OSError:
            state.decoding[self.server] += len(slots)  # not handed off: the caller releases them as such
            raise
        pending = self.pending[req_id] = Pending(settle, slots, seq, now)
        pending.timer = self.loop.call_later(max(0.0, deadline - now), self._expire, pending)
        return pending

    def abandon(self, pending: Pending, reason: str = "disconnected") -> None:
        """The client is gone (or the deadline passed): a worker that has not started the request
        drops it, and its slots come back with the worker's answer."""
        if pending.settled:
            return
        self.state.slot_cancel[pending.slots[0]] = 1
        pending.abandoned_at = time.monotonic()
        metrics().dropped.labels(reason=reason).inc()
        pending.finish(DeadlineExceeded() if reason == "deadline" else ConnectionAbortedError())

    def _expire(self, pending: Pending) -> None:
        pending.timer = None
        self.abandon(pending, "deadline")

    # ------------------------------------------------------------ answers

    def _on_readable(self) -> None:
        while True:
            try:
                size = self.sock.recv_into(self.buffer)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            if size < ANSWER.size:
                continue
            self._handle(memoryview(self.buffer)[:size])

    def _handle(self, record: memoryview) -> None:
        req_id, seq, kind, worker, k, n, frag, frags, batch, queue_wait, infer, _span = ANSWER.unpack_from(record)
        if kind == WORKER_DEAD:
            self._worker_died(req_id)
            return
        if kind == SHUTDOWN:
            if self.on_shutdown is not None:
                self.on_shutdown()
            return
        pending = self.pending.get(req_id)
        if pending is None or pending.seq != seq:
            return  # a message for a process that is gone, or already settled
        pending.parts.append(bytes(record[ANSWER.size:]))
        if frag + 1 < frags:
            return
        del self.pending[req_id]
        self.release(pending.slots)
        if pending.settled:  # abandoned: the slots were all it was waiting for
            return
        if kind == OK:
            payload = b"".join(pending.parts)
            ids = np.frombuffer(payload, "<i4", n * k).reshape(n, k)
            confidences = np.frombuffer(payload, "<f4", n * k, 4 * n * k).reshape(n, k)
            metrics().handoff.observe(max(0.0, time.monotonic() - pending.sent_at - queue_wait - infer))
            self._adapt(queue_wait)
            pending.finish(Answer(ids, confidences, queue_wait, infer, batch))
        elif kind == DROPPED:
            pending.finish(DeadlineExceeded())
        elif kind == ERROR:
            pending.finish(InferenceFailed(b"".join(pending.parts).decode("utf-8", "replace")))

    def _adapt(self, queue_wait: float) -> None:
        """Keep the queue wait near the allowed queueing time (AIMD on the admission limit)."""
        if queue_wait > self.max_queue_wait:
            now = time.monotonic()
            if now - self.shrunk_at > self.max_queue_wait:
                self.limit = max(1, int(self.limit * 0.8))
                self.shrunk_at = now
        elif queue_wait < self.max_queue_wait / 2 and self.limit < self.limit_max:
            self.limit += 1
        metrics().admission_limit.set(self.limit)

    def _worker_died(self, worker: int) -> None:
        taken = self.state.slot_taken
        for req_id, pending in list(self.pending.items()):
            if taken[pending.slots[0]] != worker:
                continue
            del self.pending[req_id]
            self.release(pending.slots)
            if not pending.settled:
                metrics().dropped.labels(reason="worker_died").inc()
                pending.finish(WorkerDied(f"inference worker {worker} died while computing this request: retry"))

    def _sweep(self) -> None:
        now = time.monotonic()
        for req_id, pending in list(self.pending.items()):
            if pending.abandoned_at is not None and now - pending.abandoned_at > ORPHAN_S:
                del self.pending[req_id]
                self.state.slot_seq[pending.slots[0]] += 1  # a late message for it is stale now
                self.release(pending.slots)
        self.loop.call_later(SWEEP_S, self._sweep)
