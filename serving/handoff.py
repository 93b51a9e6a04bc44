"""The hand-off between HTTP processes and inference workers: shared memory for images, sockets
for small messages. Nothing here pickles an image or passes through a manager process.

    HTTP process i                                       inference worker w (any free one)
    take n free slots of its own partition   ---------   recv a descriptor (SOCK_SEQPACKET: one
    decode each image straight into a slot                record per message, atomic, shared by
    send a descriptor (~60 bytes) ---------------------->  all workers: whoever is free takes it)
                                                          read the images from the slots (one copy
                                                          into the batch), run the model
    answer socket i (one per HTTP process) <------------  send ids/confidences (+ timings)
    free the slots, answer the client

Slot pool: `servers x slots_per_server` images of the model's input size in one shared buffer.
HTTP process i owns partition i: only it allocates, writes and frees those slots, so there is no
cross-process lock anywhere (a process killed at any instruction cannot leave a lock held).
Workers only read images. Per slot, three small shared arrays:
  seq      bumped by the owner at every allocation; a descriptor carries it, and a worker skips
           a descriptor whose slot has been reallocated since (a stale message of a dead process)
  cancel   set by the owner when the client is gone or the deadline passed: dropped before inference
  taken    the worker that picked the request up (-1 before): when a worker dies, exactly the
           requests it held get a fast 503; those still queued are served by the others
A slot returns to its owner's free list when the answer (or "dropped") arrives, when the worker
holding it is reported dead, or, for a message lost with a killed worker, after an orphan timeout.
Per HTTP process, one more shared number: `decoding`, the images it holds slots for and has not
handed off yet (their upload is read, they are being decoded). A worker waits for a batch to fill
(--batch-timeout) only while some are on their way (serving/batching.py).

Sockets are AF_UNIX SOCK_SEQPACKET socketpairs created by the supervisor before any child
starts: one request socket (all HTTP processes write, all workers read) and one answer socket per
HTTP process (all workers and the supervisor write, that HTTP process reads). The supervisor keeps
every end, so a respawned process gets the same sockets and nothing queued is lost.
"""

from __future__ import annotations

import ctypes
import os
import select
import socket
import struct
import time
from dataclasses import dataclass
from multiprocessing.sharedctypes import RawArray

import numpy as np

from serving.cpus import cores_to_spare, cpu_count

# ---------------------------------------------------------------- wire formats

REQUEST = struct.Struct("<QHqBHHdd")  # req_id, server, seq, mode, k, n, sent_at, deadline; then n x uint32 slots
ANSWER = struct.Struct("<QqBBHHHHHfff")  # req_id, seq, kind, worker, k, n, frag, frags, batch, queue_wait, infer, span
MODE_CLASS, MODE_TOP, MODE_STOP = 0, 1, 255
OK, ERROR, DROPPED, WORKER_DEAD, SHUTDOWN = 0, 1, 2, 3, 4
FRAGMENT_BYTES = 60_000  # answers above this are split (a record must fit the socket buffer)
SOCKET_BUFFER = 4 << 20  # asked for; the kernel caps it at net.core.wmem_max / rmem_max
RECEIVE_BYTES = 1 << 17
ANSWER_WAIT_S = 2.0

# worker status codes in shared memory (1..3 are written by LitServe's worker entry, see litserve_bridge)
W_NONE, W_STARTING, W_READY, W_ERROR, W_DEAD = 0, 1, 2, 3, 4
STATUS_NAMES = {W_NONE: "starting", W_STARTING: "starting", W_READY: "ready", W_ERROR: "error", W_DEAD: "restarting"}

# shared flags
F_DRAINING, F_STARTED = 0, 1


@dataclass(frozen=True)
class Descriptor:
    req_id: int
    server: int
    seq: int
    mode: int
    k: int
    slots: tuple[int, ...]
    sent_at: float
    deadline: float

    def pack(self) -> bytes:
        return REQUEST.pack(self.req_id, self.server, self.seq, self.mode, self.k, len(self.slots), self.sent_at,
                            self.deadline) + np.asarray(self.slots, np.uint32).tobytes()

    @classmethod
    def unpack(cls, data: bytes) -> Descriptor:
        req_id, server, seq, mode, k, n, sent_at, deadline = REQUEST.unpack_from(data)
        slots = tuple(np.frombuffer(data, np.uint32, n, REQUEST.size).tolist())
        return cls(req_id, server, seq, mode, k, slots, sent_at, deadline)


STOP = Descriptor(0, 0, 0, MODE_STOP, 0, (), 0.0, 0.0)


def answer_records(req_id: int, seq: int, kind: int, worker: int, k: int, n: int, payload: bytes = b"",
                   batch: int = 0, queue_wait: float = 0.0, infer: float = 0.0, span: float = 0.0) -> list[bytes]:
    """One answer as one or more records (large top-k answers are split into fragments)."""
    chunks = [payload[i:i + FRAGMENT_BYTES] for i in range(0, len(payload), FRAGMENT_BYTES)] or [b""]
    return [ANSWER.pack(req_id, seq, kind, worker, k, n, index, len(chunks), batch, queue_wait, infer, span) + chunk
            for index, chunk in enumerate(chunks)]


def writable(sock: socket.socket, timeout: float) -> bool:
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLOUT)
    return bool(poller.poll(timeout * 1000))


def seqpacket_pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    for sock in (a, b):
        for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            try:
                sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
            except OSError:
                pass
    return a, b


# ---------------------------------------------------------------- shared state


class SharedState:
    """Everything the processes share, created by the supervisor before any child starts. HTTP
    processes inherit it (fork); workers receive it as a Process argument (spawn pickling)."""

    def __init__(self, servers: int, slots_per_server: int, workers: int, image_shape: tuple[int, int, int]):
        self.servers, self.slots_per_server, self.workers = servers, slots_per_server, workers
        self.image_shape = tuple(image_shape)
        total = servers * slots_per_server
        self.image_buffer = RawArray(ctypes.c_uint8, total * int(np.prod(image_shape)))
        self.slot_seq = RawArray(ctypes.c_int64, total)
        self.slot_cancel = RawArray(ctypes.c_int8, total)
        self.slot_taken = RawArray(ctypes.c_int16, total)
        self.worker_status = RawArray(ctypes.c_int8, workers)
        self.worker_pid = RawArray(ctypes.c_int64, workers)
        self.flags = RawArray(ctypes.c_int64, 8)
        self.decoding = RawArray(ctypes.c_int64, servers)  # written by HTTP process i only (entry i)
        self.request_send, self.request_recv = seqpacket_pair()
        self.answer_recv, self.answer_send = zip(*(seqpacket_pair() for _ in range(servers)))
        self.request_send.setblocking(False)  # HTTP side: never block the event loop (EAGAIN -> 503)
        for sock in self.answer_send:
            sock.setblocking(False)  # a worker never hangs on an HTTP process that stopped reading
        self._images = None

    @property
    def total_slots(self) -> int:
        return self.servers * self.slots_per_server

    @property
    def images(self) -> np.ndarray:
        """The slot pool as a [slots, H, W, 3] uint8 array (a view of shared memory)."""
        if self._images is None:
            self._images = np.frombuffer(self.image_buffer, np.uint8).reshape((self.total_slots, *self.image_shape))
        return self._images

    def partition(self, server: int) -> range:
        return range(server * self.slots_per_server, (server + 1) * self.slots_per_server)

    def ready_workers(self) -> int:
        return sum(1 for code in self.worker_status if code == W_READY)

    def worker_states(self) -> list[str]:
        return [STATUS_NAMES.get(code, "starting") for code in self.worker_status]

    def for_worker(self, spin_s: float = 0.0) -> WorkerSide:
        return WorkerSide(self.image_buffer, self.image_shape, self.slot_seq, self.slot_cancel, self.slot_taken,
                          self.request_recv, tuple(self.answer_send), self.decoding, spin_s)

    def send_notice(self, server: int, kind: int, subject: int) -> None:
        """A supervisor message to HTTP process `server` (worker died, shut down)."""
        sock = self.answer_send[server]
        try:
            if writable(sock, ANSWER_WAIT_S):
                sock.send(answer_records(subject, 0, kind, 0, 0, 0)[0])
        except OSError:
            pass


class WorkerSide:
    """The part of SharedState an inference worker needs (picklable for spawn).

    Waiting for a request: a worker that has just served, on a machine with a core to spare, polls
    the request socket for up to `spin_s` (--worker-spin-us), calling sched_yield between polls,
    and only then sleeps in poll(2): a sleeping worker takes 0.1-0.3 ms to wake (a VM's idle vCPU),
    once per request under light load. When every core is busy (decoding, the other worker) it
    sleeps at once, and so does a worker that polled a whole window in vain (idle) until its next
    request."""

    def __init__(self, image_buffer, image_shape, slot_seq, slot_cancel, slot_taken, request_recv, answer_send,
                 decoding, spin_s: float = 0.0):
        self.image_buffer, self.image_shape = image_buffer, tuple(image_shape)
        self.slot_seq, self.slot_cancel, self.slot_taken = slot_seq, slot_cancel, slot_taken
        self.request_recv, self.answer_send = request_recv, tuple(answer_send)
        self.decoding = decoding
        self.spin_s = spin_s
        self.serving = False  # a request came since the last window polled in vain
        self.cores = cpu_count()
        self._images = None
        self._poll = None
        self._parent = os.getppid()

    def __reduce__(self):
        return (WorkerSide, (self.image_buffer, self.image_shape, self.slot_seq, self.slot_cancel, self.slot_taken,
                             self.request_recv, self.answer_send, self.decoding, self.spin_s))

    def images_on_the_way(self) -> int:
        """Images some HTTP process is decoding right now: each will be a descriptor within milliseconds."""
        return sum(self.decoding)

    @property
    def images(self) -> np.ndarray:
        if self._images is None:
            total = len(self.slot_seq)
            self._images = np.frombuffer(self.image_buffer, np.uint8).reshape((total, *self.image_shape))
        return self._images

    def receive(self, timeout: float | None) -> Descriptor | None:
        """The next descriptor, waiting up to `timeout` seconds (0: only what is already there)."""
        if self._poll is None:
            self.request_recv.setblocking(False)
            for sock in self.answer_send:
                sock.setblocking(False)  # see answer()
            self._poll = select.poll()
            self._poll.register(self.request_recv.fileno(), select.POLLIN)
        now = time.monotonic()
        deadline = None if timeout is None else now + timeout
        spin_until = None  # decided when nothing is there (a machine-wide read, so not before)
        while True:
            try:  # every worker polls the same socket: one of them gets each record
                descriptor = Descriptor.unpack(self.request_recv.recv(4096))
                self.serving = True
                return descriptor
            except BlockingIOError:
                pass
            now = time.monotonic()
            remaining = None if deadline is None else deadline - now
            if remaining is not None and remaining <= 0:
                return None  # (a batch-fill wait shorter than the window: still serving)
            if spin_until is None:
                spin_until = now + self.spin_s if self.serving and self.spin_s and cores_to_spare(self.cores) else now
            if now < spin_until:
                os.sched_yield()
                continue
            self.serving = False  # a whole window without a request: idle until the next one
            self._poll.poll(None if remaining is None else max(1, int(remaining * 1000)))

    def parent_gone(self) -> bool:
        return os.getppid() != self._parent

    def answer(self, server: int, records: list[bytes]) -> None:
        """Send to HTTP process `server`, waiting at most ANSWER_WAIT_S for room in its socket:
        if it stopped reading (dead, or stuck), the worker must not hang with it."""
        sock = self.answer_send[server]
        for record in records:
            try:
                sock.send(record)  # non-blocking: one system call in the usual case
            except BlockingIOError:
                if not writable(sock, ANSWER_WAIT_S):
                    return
                try:
                    sock.send(record)
                except OSError:
                    return
            except OSError:  # the HTTP process is gone: its successor does not need this
                return
