"""The main process: starts the HTTP processes and the inference workers, watches them, drains.

Supervision policy (README, "Failure model"):
- An inference worker that dies is noticed at once (its process sentinel): it is marked
  "restarting", every HTTP process is told, so the requests it held get a fast 503 (the requests
  still queued are served by the other workers), and it is respawned with the model reloaded.
  /ready stays 200 ("degraded") while another worker serves, 503 when none can.
- An HTTP process that dies is forked again at once (its open connections are reset by the
  kernel; clients see a connection error, never a hang).
- Respawning that keeps failing ends the server with exit status 1 so that the platform restarts
  it: a worker that fails MAX_FAILED_STARTS times in a row before becoming ready, more than
  CRASH_LIMIT deaths within CRASH_WINDOW_S seconds, or any worker failing during start-up.
- SIGTERM or SIGINT, to this process or to the whole process group (children ignore both): /ready
  turns 503 at once; after --drain-grace seconds the HTTP processes stop accepting connections and
  finish what they accepted; then the workers stop; exit 0 (1 if --drain-timeout ran out first).
  A second signal stops everything at once.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import signal
import socket
import time
from collections import deque
from multiprocessing.connection import wait

from serving.handoff import F_DRAINING, F_STARTED, SHUTDOWN, STOP, W_DEAD, W_ERROR, W_READY, W_STARTING, WORKER_DEAD
from serving.httpserver import die_with_parent, http_main, ignore_stop_signals, name_process
from serving.litserve_bridge import prepare_api, run_inference_worker, status_key
from serving.metrics import mark_process_dead, metrics

log = logging.getLogger("serving")

MAX_FAILED_STARTS = 3
CRASH_LIMIT, CRASH_WINDOW_S = 6, 60.0
RESPAWN_BACKOFF_S = (0.0, 0.5, 1.0, 2.0, 4.0)
TICK_S = 0.25
WORKER_STOP_S = 5.0


def worker_main(lit_api, device: str, worker_id: int, side, answers, status_codes, nice: int = 0,
                sched: str = "normal") -> None:
    """Entry point of an inference worker process (spawned)."""
    ignore_stop_signals()
    die_with_parent()
    name_process(f"onnxship-work{worker_id}")
    if nice:  # the HTTP processes go first: rejections and /health stay fast when the cores are full
        try:
            os.nice(nice)
        except OSError:
            pass
    if sched == "batch":
        use_batch_scheduling()
    run_inference_worker(lit_api, device, worker_id, side, answers, status_codes)


def use_batch_scheduling() -> None:
    """SCHED_BATCH: same CPU share, but a wake-up (a request's descriptor) does not preempt the
    process on the core; on a GPU replica that process is an HTTP process decoding, the worker
    then takes the images of one scheduler tick in one batch (README, "Host overhead")."""
    try:
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    except (AttributeError, OSError):  # not Linux: the default policy
        log.debug("SCHED_BATCH is not available here")


class Supervisor:
    def __init__(self, config, info, api, state, devices: list[str]):
        from serving.batching import Answers

        self.config, self.info, self.api, self.state, self.devices = config, info, api, state, devices
        self.worker_names = [status_key(api, w) for w in range(len(devices))]
        self.answers = Answers(state.for_worker(config.worker_spin_us / 1e6))
        self.side = self.answers.side
        self.workers: list = [None] * len(devices)
        self.https: list = [None] * state.servers
        self.failed_starts = [0] * len(devices)
        # a worker that reported ready once has loaded the model: its later failures are restarts, never a
        # start-up failure, even when it died before this loop saw every worker ready (/ready answered 200)
        self.ever_ready = [False] * len(devices)
        self.respawn_at: dict[tuple[str, int], float] = {}
        self.crashes: deque[float] = deque()
        self.stop_signals = 0
        self.signal_name = ""
        self.drain_started: float | None = None
        self.accepting = True
        self.fatal: str | None = None
        self.sock: socket.socket | None = None
        prepare_api(api)

    # ------------------------------------------------------------ processes

    def start_worker(self, w: int) -> None:
        self.state.worker_status[w] = W_STARTING
        process = mp.get_context("spawn").Process(
            target=worker_main, name=f"onnxship-worker{w}",
            args=(self.api, self.devices[w], w, self.side, self.answers, self.state.worker_status,
                  self.config.worker_nice or 0, self.config.worker_sched))
        process.start()
        self.state.worker_pid[w] = process.pid
        self.workers[w] = process

    def start_http(self, i: int) -> None:
        process = mp.get_context("fork").Process(
            target=http_main, name=f"onnxship-http{i}",
            args=(i, self.config, self.info, self.state, self.worker_names, self.sock))
        process.start()
        self.https[i] = process

    # ------------------------------------------------------------ signals

    def _on_signal(self, signum, frame) -> None:
        self.stop_signals += 1
        self.signal_name = signal.Signals(signum).name

    def install_signals(self) -> int:
        read, write = os.pipe()
        os.set_blocking(read, False)
        os.set_blocking(write, False)
        signal.set_wakeup_fd(write)
        signal.signal(signal.SIGINT, self._on_signal)  # explicit: a background shell starts us with SIGINT ignored
        signal.signal(signal.SIGTERM, self._on_signal)
        return read

    # ------------------------------------------------------------ the loop

    def run(self, sock: socket.socket) -> int:
        self.sock = sock
        name_process("onnxship-main")
        wakeup = self.install_signals()
        for i in range(self.state.servers):
            self.start_http(i)
        for w in range(len(self.workers)):
            self.start_worker(w)
        try:
            while True:
                sentinels = {p.sentinel: ("worker", w) for w, p in enumerate(self.workers) if p is not None}
                sentinels.update({p.sentinel: ("http", i) for i, p in enumerate(self.https) if p is not None})
                for ready in wait([*sentinels, wakeup], timeout=TICK_S):
                    if ready == wakeup:
                        try:
                            os.read(wakeup, 512)
                        except OSError:
                            pass
                    else:
                        self.on_exit(*sentinels[ready])
                if self.stop_signals >= 2 or self.fatal:
                    return self.stop_now()
                if self.stop_signals and self.drain_started is None:
                    self.begin_drain()
                if self.drain_started is not None:
                    code = self.drain_step()
                    if code is not None:
                        return code
                    continue
                self.check_startup()
                self.respawn_due()
        finally:
            signal.set_wakeup_fd(-1)

    def check_startup(self) -> None:
        status = self.state.worker_status
        for w, code in enumerate(status):
            if code == W_READY:
                self.ever_ready[w], self.failed_starts[w] = True, 0
        if not self.state.flags[F_STARTED]:
            failed = [w for w in range(len(status)) if status[w] == W_ERROR and not self.ever_ready[w]]
            if failed:
                self.fatal = f"inference worker {failed[0]} failed to load the model (see the log above)"
            elif all(self.ever_ready):
                self.state.flags[F_STARTED] = 1
                self.report_ready()

    def report_ready(self) -> None:
        """Log the time to ready and keep it for GET /model (startup.json)."""
        startup = self.info.startup()
        if startup["ready_after_s"] is None:  # a note is missing (no state dir): the supervisor's own view
            startup = {"ready_after_s": round(time.monotonic() - self.info.started, 3)}
        path = self.info.state_dir / "startup.json"
        path.with_suffix(".tmp").write_text(json.dumps(startup))
        path.with_suffix(".tmp").replace(path)
        log.info("ready in %.2f s: %d inference worker(s) (slowest: session build %.2f s, warm-up %.2f s), "
                 "%d HTTP process(es), admission bound %d images", startup["ready_after_s"], len(self.workers),
                 startup.get("session_build_s") or 0.0, startup.get("warmup_s") or 0.0, self.state.servers,
                 self.state.total_slots)

    def on_exit(self, kind: str, index: int) -> None:
        process = (self.workers if kind == "worker" else self.https)[index]
        process.join(0)
        pid, code = process.pid, process.exitcode
        mark_process_dead(pid)
        if kind == "worker":
            self.workers[index] = None
            was_ready = self.state.worker_status[index] == W_READY
            self.ever_ready[index] = self.ever_ready[index] or was_ready
            self.state.worker_status[index] = W_DEAD
            self.state.worker_pid[index] = 0
            for server in range(self.state.servers):
                self.state.send_notice(server, WORKER_DEAD, index)
            if self.drain_started is not None:
                return
            log.error("inference worker %d (pid %d) exited with %s%s: restarting it", index, pid, code,
                      "" if was_ready else " before it was ready")
            if not self.state.flags[F_STARTED] and not self.ever_ready[index]:  # died loading the model, never after
                self.fatal = f"inference worker {index} exited during start-up (status {code})"
                return
            self.failed_starts[index] = 0 if was_ready else self.failed_starts[index] + 1
            if self.failed_starts[index] >= MAX_FAILED_STARTS:
                self.fatal = f"inference worker {index} failed {MAX_FAILED_STARTS} restarts in a row"
                return
        else:
            self.https[index] = None
            self.state.decoding[index] = 0  # its uploads died with it: no worker should wait for them
            if self.drain_started is not None:
                return
            log.error("HTTP process %d (pid %d) exited with %s: restarting it", index, pid, code)
        now = time.monotonic()
        self.crashes.append(now)
        while self.crashes and now - self.crashes[0] > CRASH_WINDOW_S:
            self.crashes.popleft()
        if len(self.crashes) > CRASH_LIMIT:
            self.fatal = f"{len(self.crashes)} process deaths within {CRASH_WINDOW_S:g} s"
            return
        failures = self.failed_starts[index] if kind == "worker" else 0
        self.respawn_at[(kind, index)] = now + RESPAWN_BACKOFF_S[min(failures, len(RESPAWN_BACKOFF_S) - 1)]

    def respawn_due(self) -> None:
        now = time.monotonic()
        for (kind, index), when in list(self.respawn_at.items()):
            if when <= now:
                del self.respawn_at[(kind, index)]
                metrics().restarts.labels(kind=kind).inc()
                (self.start_worker if kind == "worker" else self.start_http)(index)

    # ------------------------------------------------------------ drain and stop

    def begin_drain(self) -> None:
        self.drain_started = time.monotonic()
        self.state.flags[F_DRAINING] = 1
        self.respawn_at.clear()
        log.info("%s received: draining (/ready is 503; connections accepted for %gs more; at most %gs in all)",
                 self.signal_name or "stop signal", self.config.drain_grace, self.config.drain_timeout)

    def drain_step(self) -> int | None:
        elapsed = time.monotonic() - self.drain_started
        if self.accepting and elapsed >= self.config.drain_grace:
            self.accepting = False
            for server in range(self.state.servers):
                self.state.send_notice(server, SHUTDOWN, 0)
            self.sock.close()  # with the HTTP processes' copies closed too, new connections are refused
        if any(p is not None for p in self.https):
            if elapsed < self.config.drain_timeout:
                return None
            log.error("drain timeout (%gs): stopping the HTTP processes with requests still open",
                      self.config.drain_timeout)
            self.kill(self.https)
            self.stop_workers()
            return 1
        self.stop_workers()
        log.info("drained: every accepted request was answered")
        return 0

    def stop_workers(self) -> None:
        for _ in self.workers:
            try:
                self.state.request_send.send(STOP.pack())
            except OSError:
                break
        deadline = time.monotonic() + WORKER_STOP_S
        for process in self.workers:
            if process is not None:
                process.join(max(0.0, deadline - time.monotonic()))
        self.kill(self.workers)

    def stop_now(self) -> int:
        if self.fatal:
            log.error("giving up: %s; exiting with status 1 so that the platform restarts the server", self.fatal)
        else:
            log.warning("second stop signal: stopping at once")
        self.kill(self.https)
        self.kill(self.workers)
        return 1

    @staticmethod
    def kill(processes: list) -> None:
        for process in processes:
            if process is not None and process.is_alive():
                process.kill()
        for process in processes:
            if process is not None:
                process.join(5)


def worker_devices(device: str, workers: int, gpus: int) -> list[str]:
    """One entry per inference worker: `workers` per GPU on CUDA (LitServe's workers_per_device)."""
    if device != "cuda":
        return ["cpu"] * workers
    return [f"cuda:{g}" for _ in range(workers) for g in range(max(1, gpus))]


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock
