"""Dynamic batching for the inference workers: block for the first request, then take what else
arrives within `batch_timeout`, up to `max_batch_size` images.

LitServe 0.2.19's built-in batched loop polls its request queue without blocking (timeout 0) or
in 1 ms slices (timeout > 0), so an idle worker spins on the queue and keeps a core busy; on a
2-core machine that core is the one the HTTP processes need for decoding. It also counts
requests, while one of our requests may carry several images. This loop reuses LitServe's
worker loop (`BatchedLoop.run_batched_loop`: predict, unbatch, encode, per-request responses)
and replaces only how a batch is collected.
"""

from __future__ import annotations

import time
from queue import Empty

from litserve.loops.base import _SENTINEL_VALUE, _StopLoopError
from litserve.loops.simple_loops import BatchedLoop
from litserve.utils import LitAPIStatus, LoopResponseType

IDLE_WAIT_S = 1.0  # a blocked worker wakes this often (for timeouts); costs nothing while idle


def payload_size(payload) -> int:
    """Images a request payload carries (1 for anything that does not say)."""
    return int(getattr(payload, "count", 1) or 1)


class GreedyBatchLoop(BatchedLoop):
    def get_batch_requests(self, lit_api, request_queue, transport):
        payloads, timed_out = [], []
        try:
            item = request_queue.get(timeout=IDLE_WAIT_S)
        except Empty:
            return payloads, timed_out
        deadline = time.monotonic() + lit_api.batch_timeout
        apply_timeout = lit_api.request_timeout not in (-1, False, None)
        images = 0
        while True:
            if item == _SENTINEL_VALUE:
                raise _StopLoopError()
            response_queue_id, uid, timestamp, payload = item
            self.put_response(transport, response_queue_id, uid, (), LitAPIStatus.START, LoopResponseType.REGULAR)
            if apply_timeout and time.monotonic() - timestamp > lit_api.request_timeout:
                timed_out.append((response_queue_id, uid))
            else:
                payloads.append((response_queue_id, uid, payload))
                images += payload_size(payload)
            if images >= lit_api.max_batch_size:
                break
            remaining = deadline - time.monotonic()
            try:
                item = request_queue.get(timeout=remaining) if remaining > 0 else request_queue.get_nowait()
            except Empty:
                break
        return payloads, timed_out
