"""Overload and fault load test (issue 10): open loop, bounded in time, loopback only.

    python -m benchmarks.overload --model models/model.onnx [--overload-seconds 30] [--factor 2]
    python -m benchmarks.overload ... --compare ../old-checkout      # the same run against an older server

Phases, one server at a time (its own process group, stopped by PID at the end):
  1 idle      resident memory of the whole process tree once ready
  2 capacity  closed loop, --concurrency clients, --capacity-seconds: successful img/s
  3 overload  open loop at --factor x capacity (Poisson arrivals, --client-timeout per request) for
              --overload-seconds, while /health is probed every 100 ms and memory every 0.5 s:
              goodput, shed (503) and lost (client timeout or connection reset) counts, latency of
              rejections, /health latency, peak memory
  4 recovery  right after: the closed loop again in 0.5 s windows until one reaches 80% of capacity
  5 kill -9   one inference worker killed under closed-loop load: time until requests succeed
              again, until /ready is fully "ready", and requests that failed or hung
Prints each figure against the targets of issue 10.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from benchmarks.loadgen import (REPO_ROOT, bench_env, bench_http, encoded_request, free_port, jpeg_bodies, multipart,
                                server_command, start_server, stop_server)
from benchmarks.procstat import pids_by_role, rss_bytes

KEY = "overload-" + uuid.uuid4().hex
MIB = 1 << 20
TARGETS = ("goodput >= 0.8 x capacity, lost <= 1%, p99 rejection < 50 ms, peak RSS <= 2 x idle + 300 MiB, "
           "full speed within 5 s, after kill -9 success within 20 s and nothing hung")


@dataclass
class Outcomes:
    ok: list[float] = field(default_factory=list)  # latencies in ms
    shed: list[float] = field(default_factory=list)
    other: dict[int, int] = field(default_factory=dict)
    timeouts: int = 0
    resets: int = 0

    @property
    def total(self) -> int:
        return len(self.ok) + len(self.shed) + sum(self.other.values()) + self.timeouts + self.resets

    @property
    def lost(self) -> int:
        return self.timeouts + self.resets


async def http_request(port: int, raw: bytes, timeout: float, pool: list) -> tuple[int, float]:
    """One request on a pooled keep-alive connection: (status, seconds); raises on timeout/reset."""
    start = time.perf_counter()
    reader, writer = pool.pop() if pool else await asyncio.open_connection("127.0.0.1", port)
    try:
        async with asyncio.timeout(timeout):
            writer.write(raw)
            head = await reader.readuntil(b"\r\n\r\n")
            length, close = 0, False
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
                elif name.strip().lower() == b"connection" and b"close" in value.lower():
                    close = True
            await reader.readexactly(length)
    except BaseException:
        writer.close()
        raise
    if close:
        writer.close()
    else:
        pool.append((reader, writer))
    return int(head[9:12]), time.perf_counter() - start


async def open_loop(port: int, requests: list[bytes], rate: float, seconds: float, timeout: float,
                    seed: int = 0) -> Outcomes:
    outcomes, pool, tasks = Outcomes(), [], []
    rng = random.Random(seed)

    async def one(raw: bytes) -> None:
        try:
            status, elapsed = await http_request(port, raw, timeout, pool)
        except (TimeoutError, asyncio.TimeoutError):
            outcomes.timeouts += 1
            return
        except (OSError, asyncio.IncompleteReadError, ValueError):
            outcomes.resets += 1
            return
        if status == 200:
            outcomes.ok.append(elapsed * 1000)
        elif status == 503:
            outcomes.shed.append(elapsed * 1000)
        else:
            outcomes.other[status] = outcomes.other.get(status, 0) + 1

    start, next_at, i = time.perf_counter(), 0.0, 0
    while next_at < seconds:
        delay = start + next_at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one(requests[i % len(requests)])))
        i += 1
        next_at += rng.expovariate(rate)
    await asyncio.gather(*tasks)
    for _, writer in pool:
        writer.close()
    return outcomes


async def probe_health(port: int, stop: asyncio.Event, latencies: list[float], failures: list[str]) -> None:
    raw = f"GET /health HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
    pool: list = []
    while not stop.is_set():
        try:
            status, elapsed = await http_request(port, raw, 5.0, pool)
            latencies.append(elapsed * 1000)
            if status != 200:
                failures.append(str(status))
        except Exception as error:  # noqa: BLE001 - any failure of a probe is a finding
            failures.append(type(error).__name__)
        await asyncio.sleep(0.1)


async def sample_rss(pid: int, stop: asyncio.Event, peak: list[int]) -> None:
    while not stop.is_set():
        peak[0] = max(peak[0], await asyncio.to_thread(rss_bytes, pid))
        await asyncio.sleep(0.5)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def recovery_seconds(port: int, bodies: list[bytes], concurrency: int, capacity: float,
                     limit: float = 20.0) -> float | None:
    """Closed loop in 0.5 s windows right after the overload: seconds until a window reaches 80%."""
    started = time.perf_counter()
    while time.perf_counter() - started < limit:
        level = bench_http("recovery", port, "/predict", {"X-API-Key": KEY}, bodies, concurrency, 0.5, 0.0)
        if level.throughput >= 0.8 * capacity:
            return time.perf_counter() - started
    return None


def kill_worker_run(port: int, pid: int, bodies: list[bytes], concurrency: int, timeout: float) -> dict:
    """Closed-loop load; one inference worker is killed with SIGKILL 2 s in; 25 s in all."""
    workers = pids_by_role(pid).get("worker", [])
    if not workers:
        return {"error": "no inference worker found"}
    raws = [encoded_request(port, "/predict", {"X-API-Key": KEY}, *multipart(b)) for b in bodies]
    result: dict = {"killed_pid": workers[0]}

    async def main() -> None:
        pool: list = []
        killed_at = time.perf_counter() + 2.0
        stop_at = killed_at + 23.0
        events: list[tuple[float, str]] = []

        async def client(w: int) -> None:
            i = w
            while time.perf_counter() < stop_at:
                sent = time.perf_counter()
                try:
                    status, _ = await http_request(port, raws[i % len(raws)], timeout, pool)
                    events.append((sent, str(status)))
                except (TimeoutError, asyncio.TimeoutError):
                    events.append((sent, "hung"))
                except (OSError, asyncio.IncompleteReadError):
                    events.append((sent, "reset"))
                i += concurrency

        async def killer() -> None:
            await asyncio.sleep(max(0.0, killed_at - time.perf_counter()))
            os.kill(workers[0], signal.SIGKILL)
            ready_at, degraded_seen = None, False
            while time.perf_counter() < stop_at and ready_at is None:
                body = await asyncio.to_thread(_ready_body, port)
                if body.get("status") != "ready" or body.get("ready") is False:
                    degraded_seen = True
                current = set(pids_by_role(pid).get("worker", []))
                replaced = workers[0] not in current and len(current) >= len(workers)
                if replaced and body.get("status", "ready") == "ready" and body.get("ready", True):
                    ready_at = time.perf_counter()
                await asyncio.sleep(0.1)
            result["degraded_seen"] = degraded_seen
            result["fully_ready_s"] = None if ready_at is None else round(ready_at - killed_at, 2)

        await asyncio.gather(killer(), *(client(w) for w in range(concurrency)))
        after = [(t - killed_at, outcome) for t, outcome in events if t >= killed_at]
        first_ok = next((t for t, outcome in sorted(after) if outcome == "200"), None)
        result["first_success_s"] = None if first_ok is None else round(first_ok, 2)
        result["after_kill"] = {k: sum(1 for _, o in after if o == k) for k in sorted({o for _, o in after})}
        result["hung"] = sum(1 for _, o in events if o == "hung")

    asyncio.run(main())
    return result


def _ready_body(port: int) -> dict:
    import http.client

    try:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        connection.request("GET", "/ready")
        return json.loads(connection.getresponse().read())
    except (OSError, ValueError):
        return {"ready": False}


def run(label: str, model: Path, cwd: Path, extra: list[str], bodies: list[bytes], args) -> dict:
    port = free_port()
    server = start_server(server_command(model, port, extra), bench_env(KEY), port, "/ready", cwd=cwd)
    report: dict = {"system": label}
    try:
        bench_http("warmup", port, "/predict", {"X-API-Key": KEY}, bodies, args.concurrency, 2.0, 0.5)
        time.sleep(1.0)
        idle = rss_bytes(server.pid)
        capacity = bench_http("capacity", port, "/predict", {"X-API-Key": KEY}, bodies, args.concurrency,
                              args.capacity_seconds, 1.0).throughput
        raws = [encoded_request(port, "/predict", {"X-API-Key": KEY}, *multipart(b)) for b in bodies]
        rate = args.factor * capacity
        health, health_failures, peak = [], [], [idle]

        async def overload() -> Outcomes:
            stop = asyncio.Event()
            side = [asyncio.ensure_future(probe_health(port, stop, health, health_failures)),
                    asyncio.ensure_future(sample_rss(server.pid, stop, peak))]
            outcomes = await open_loop(port, raws, rate, args.overload_seconds, args.client_timeout)
            stop.set()
            await asyncio.gather(*side)
            return outcomes

        started = time.perf_counter()
        outcomes = asyncio.run(overload())
        window = time.perf_counter() - started
        recovery = recovery_seconds(port, bodies, args.concurrency, capacity)
        goodput = len(outcomes.ok) / window
        report.update({
            "capacity_img_s": round(capacity, 1), "offered_req_s": round(rate, 1),
            "goodput_img_s": round(goodput, 1), "goodput_vs_capacity": round(goodput / capacity, 3) if capacity else None,
            "requests": outcomes.total, "ok": len(outcomes.ok), "shed_503": len(outcomes.shed),
            "other_status": outcomes.other, "lost": outcomes.lost, "timeouts": outcomes.timeouts,
            "resets": outcomes.resets, "lost_pct": round(100 * outcomes.lost / max(1, outcomes.total), 2),
            "ok_p50_ms": round(percentile(outcomes.ok, 50), 1), "ok_p99_ms": round(percentile(outcomes.ok, 99), 1),
            "shed_p99_ms": round(percentile(outcomes.shed, 99), 1),
            "health_p50_ms": round(percentile(health, 50), 1), "health_p99_ms": round(percentile(health, 99), 1),
            "health_max_ms": round(max(health, default=float("nan")), 1), "health_failures": len(health_failures),
            "idle_rss_mib": round(idle / MIB), "peak_rss_mib": round(peak[0] / MIB),
            "recovery_s": None if recovery is None else round(recovery, 2),
        })
        if not args.skip_kill:
            report["kill"] = kill_worker_run(port, server.pid, bodies, args.concurrency, args.client_timeout)
    finally:
        stop_server(server)
    return report


def verdicts(r: dict) -> list[str]:
    def line(name, value, ok):
        return f"  {name:<34} {value!s:<28} {'PASS' if ok else 'MISS'}"

    out = [f"{r['system']}: capacity {r['capacity_img_s']} img/s, offered {r['offered_req_s']} req/s, "
           f"{r['requests']} requests ({r['ok']} ok, {r['shed_503']} shed, {r['lost']} lost, other {r['other_status']})"]
    out.append(line("goodput / capacity (>= 0.8)", f"{r['goodput_img_s']} img/s = {r['goodput_vs_capacity']}",
                    (r["goodput_vs_capacity"] or 0) >= 0.8))
    out.append(line("lost (<= 1%)", f"{r['lost']} = {r['lost_pct']}%", r["lost_pct"] <= 1.0))
    out.append(line("p99 of a rejection (< 50 ms)", f"{r['shed_p99_ms']} ms", r["shed_p99_ms"] < 50))
    out.append(line("peak RSS (<= 2 x idle + 300 MiB)", f"{r['peak_rss_mib']} MiB (idle {r['idle_rss_mib']})",
                    r["peak_rss_mib"] <= 2 * r["idle_rss_mib"] + 300))
    out.append(line("full speed again (<= 5 s)", f"{r['recovery_s']} s", r["recovery_s"] is not None
                    and r["recovery_s"] <= 5))
    out.append(f"  /health during overload: p50 {r['health_p50_ms']} ms, p99 {r['health_p99_ms']} ms, max "
               f"{r['health_max_ms']} ms, {r['health_failures']} failed; accepted requests p50 {r['ok_p50_ms']} ms, "
               f"p99 {r['ok_p99_ms']} ms")
    kill = r.get("kill")
    if kill:
        ok = kill.get("first_success_s") is not None and kill["first_success_s"] <= 20 and kill.get("hung") == 0
        out.append(line("kill -9: success again (<= 20 s)", f"{kill.get('first_success_s')} s, hung {kill.get('hung')}", ok))
        out.append(f"  kill -9: outcomes after the kill {kill.get('after_kill')}, fully ready again after "
                   f"{kill.get('fully_ready_s')} s")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=REPO_ROOT / "models" / "model.onnx")
    parser.add_argument("--concurrency", type=int, default=8, help="closed-loop clients for capacity and recovery")
    parser.add_argument("--capacity-seconds", type=float, default=10.0)
    parser.add_argument("--overload-seconds", type=float, default=30.0)
    parser.add_argument("--factor", type=float, default=2.0, help="offered load as a multiple of the capacity")
    parser.add_argument("--client-timeout", type=float, default=10.0)
    parser.add_argument("--server-args", default="", help="extra flags for python -m serving")
    parser.add_argument("--compare", type=Path, help="also run the server of this checkout (same venv)")
    parser.add_argument("--compare-args", default="", help="extra flags for the --compare server")
    parser.add_argument("--rounds", type=int, default=1, help="alternate the servers this many times")
    parser.add_argument("--skip-kill", action="store_true")
    parser.add_argument("--max-images", type=int, default=200)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if not args.model.is_file():
        print(f"no model at {args.model}", file=sys.stderr)
        return 2
    bodies = jpeg_bodies([], args.max_images)
    print(f"{len(bodies)} JPEG bodies; model {args.model}; targets: {TARGETS}; load {os.getloadavg()}", flush=True)
    reports = []
    for _ in range(args.rounds):  # alternate, so that load from other programs hits both alike
        reports.append(run(f"this server {args.server_args}".strip(), args.model.resolve(), REPO_ROOT,
                           args.server_args.split(), bodies, args))
        if args.compare:
            reports.append(run(f"{args.compare} {args.compare_args}".strip(), args.model.resolve(),
                               args.compare.resolve(), args.compare_args.split(), bodies, args))
    for report in reports:
        print("\n".join(verdicts(report)))
    print(f"load average after the run: {os.getloadavg()}")
    if args.json:
        args.json.write_text(json.dumps(reports, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
