"""Serving benchmark: in-process ceiling vs this server (vs an older checkout) vs a seed-like baseline.

    python -m benchmarks.bench --model models/model.onnx [--concurrency 1 4 8 16] [--duration 8]
    python -m benchmarks.bench --model models/model.onnx --null            # host overhead (issue 14)
    python -m benchmarks.bench ... --compare ../old-checkout               # before/after in one run
    python -m benchmarks.bench --model int8.onnx --baseline-model models/model.onnx  # a variant vs fp32

In one run, with the same real JPEG bodies at each concurrency level (the systems take turns level
by level, so background load hits them alike):
  a   in-process  decode + ONNX Runtime in the benchmark, no HTTP. Real model: N threads, ORT
                  threads per session = cores / min(N, cores). --null: N processes (one per core
                  at most), each decoding and running the null model.
  b   server      `python -m serving` from this checkout, multipart uploads over HTTP keep-alive
  b0  before      the same from the checkout given by --compare (same venv), for before/after
  c   baseline    `python -m benchmarks.baseline`: single-process FastAPI/uvicorn shaped like the
                  seed (real model only)
The servers (b, b0) run --model; the ceiling (a) and the baseline (c) run --baseline-model (default:
--model), so a variant (int8) is measured against the fp32 seed in the same run.

--gpu-replica gives the servers the batching and process settings a CUDA device gets by default
(with --null: what the host of a GPU replica does per image).

--null builds the null twin of --model (benchmarks/null_artifact.py: same contract and metadata,
computes ~nothing), so what is left is the server's own work: HTTP, decoding, the hand-off to the
inference workers. It reports the in-process decode ceiling, the server's img/s, CPU ms per image
split into decode (in-process), HTTP (HTTP processes minus decode) and hand-off (inference
workers + other server processes, null model), and the lone-client latency added over in-process.
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

from benchmarks.loadgen import (REPO_ROOT, Level, bench_env, bench_http, free_port, jpeg_bodies, run_level,
                                server_command, start_server, stop_server, wait_for_quiet)
from benchmarks.procstat import CpuSample

BENCH_KEY = "bench-" + uuid.uuid4().hex
NAMES = {"a": "a: in-process", "b": "b: onnxship server", "b0": "b0: before", "c": "c: seed-like baseline"}


# ------------------------------------------------------------------------------------------ a: in-process


def bench_in_process_threads(model: Path, bodies: list[bytes], concurrency: int, duration: float,
                             warmup: float) -> Level:
    from serving.runtime import Classifier, cpu_count

    threads = max(1, cpu_count() // min(concurrency, cpu_count()))
    classifier = Classifier(model, device="cpu", intra_op_threads=threads)

    def call(w: int, i: int) -> bool:
        classifier.predict(classifier.load_input(bodies[i % len(bodies)]))
        return True

    level = run_level(NAMES["a"], concurrency, duration, warmup, call)
    if level.cpu is not None:  # the work ran in this process: its CPU is the system's, not a load generator's
        level.cpu = CpuSample({"main": level.cpu.self_seconds}, 0.0)
    return level


def _in_process_loop(model: str, bodies: list[bytes], offset: int, start_at: float, stop_at: float, out) -> None:
    from serving.runtime import Classifier

    classifier = Classifier(model, device="cpu", intra_op_threads=1)
    latencies, cpu_start, i = [], None, offset
    while True:
        t0 = time.time()
        if t0 >= stop_at:
            break
        if cpu_start is None and t0 >= start_at:
            cpu_start = time.process_time()
        classifier.predict(classifier.load_input(bodies[i % len(bodies)]))
        t1 = time.time()
        i += 1
        if t0 >= start_at and t1 <= stop_at:
            latencies.append((t1 - t0) * 1000)
    out.put((latencies, time.process_time() - (cpu_start or time.process_time())))


def bench_in_process_processes(model: Path, bodies: list[bytes], processes: int, duration: float,
                               warmup: float) -> Level:
    """`processes` independent processes, each decoding and running the model in a loop."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    start_at = time.time() + warmup + 2.0  # + start-up of the processes
    stop_at = start_at + duration
    workers = [ctx.Process(target=_in_process_loop, args=(str(model), bodies, 17 * n, start_at, stop_at, out))
               for n in range(processes)]
    for worker in workers:
        worker.start()
    level = Level(NAMES["a"], processes, seconds=duration, cpu=CpuSample({"main": 0.0}, 0.0))
    for _ in workers:
        latencies, cpu = out.get(timeout=duration + warmup + 120)
        level.latencies_ms += latencies
        level.cpu.by_role["main"] += cpu
    for worker in workers:
        worker.join(30)
    level.images = len(level.latencies_ms)
    return level


def served_model(port: int) -> dict:
    """What a server says it runs (GET /model): the file, its sha256, device, providers, time to ready."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("GET", "/model", headers={"X-API-Key": BENCH_KEY})
        info = json.loads(connection.getresponse().read())
    finally:
        connection.close()
    return {"file": info["file"], "sha256": info["sha256"], "device": info.get("device"),
            "providers": info.get("providers"), "startup": info.get("startup"),
            "tensorrt_cache": [w["tensorrt_cache"] for w in info.get("workers", []) if "tensorrt_cache" in w]}


# ------------------------------------------------------------------------------------------ reporting


def best(levels: list[Level]) -> Level:
    return max(levels, key=lambda level: level.throughput)


def at(levels: list[Level], concurrency: int) -> Level | None:
    return next((level for level in levels if level.concurrency == concurrency), None)


def table(results: dict[str, list[Level]], null: bool) -> list[str]:
    head = "| system | concurrency | img/s | p50 ms | p95 ms | p99 ms | CPU ms/img | HTTP procs | workers | other | loadgen | errors |"
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for key in ("a", "b", "b0", "c"):
        for level in results.get(key, []):
            r = level.row()
            lines.append(f"| {r['system']} | {r['concurrency']} | {r['img_s']} | {r['p50_ms']} | {r['p95_ms']} | "
                         f"{r['p99_ms']} | {r['cpu_ms_per_img']} | {r['http_ms']} | {r['worker_ms']} | "
                         f"{r['other_ms']} | {r['loadgen_ms']} | {r['errors']} |")
    return lines


VARIANT_TARGET = 1.25  # a model variant's server over the fp32 baseline, best concurrency each


def summarize(results: dict[str, list[Level]], null: bool, images_per_request: int = 1,
              variant: bool = False) -> tuple[dict, list[str]]:
    """The figures each issue asks for, with PASS/MISS against the targets (`variant`: the servers
    run another model than the ceiling and the baseline)."""
    summary, lines = {}, []
    a = results.get("a") or []
    a1 = at(a, 1)
    for key in ("b", "b0"):
        levels = results.get(key) or []
        if not levels:
            continue
        name = NAMES[key]
        b_best, b1 = best(levels), at(levels, 1)
        entry = {"best_img_s": round(b_best.throughput, 1), "best_concurrency": b_best.concurrency}
        if a:
            ratio = b_best.throughput / best(a).throughput
            entry["ceiling_img_s"], entry["vs_ceiling"] = round(best(a).throughput, 1), round(ratio, 3)
            target = 0.8 if null else None
            verdict = "" if target is None else f" (target >= {target}): {'PASS' if ratio >= target else 'MISS'}"
            lines.append(f"- {name}: best {b_best.throughput:.1f} img/s at {b_best.concurrency} = "
                         f"{ratio:.3f} x the in-process ceiling {best(a).throughput:.1f}{verdict}")
        if a1 and b1 and images_per_request == 1:  # (a multi-image request's latency is not one image's)
            added = b1.percentile(50) - a1.percentile(50)
            entry["lone_added_ms"] = round(added, 2)
            verdict = f" (target <= 1 ms): {'PASS' if added <= 1.0 else 'MISS'}" if null else ""
            lines.append(f"- {name}: lone client p50 {b1.percentile(50):.2f} ms, in-process {a1.percentile(50):.2f} ms: "
                         f"+{added:.2f} ms{verdict}")
        if null and a1 and a1.cpu is not None:
            decode = a1.cpu_ms_per_image()
            busiest = b_best
            http, workers, other = (busiest.cpu_ms_per_image(*r) for r in (("http",), ("worker",), ("main", "other")))
            if http is not None:
                entry["cpu_split_ms"] = {"decode": round(decode, 2), "http": round(http - decode, 2),
                                         "handoff": round(workers + other, 2)}
                lines.append(f"- {name}: CPU ms per image at concurrency {busiest.concurrency}: decode {decode:.2f} "
                             f"(in-process), HTTP {http - decode:.2f} (HTTP processes {http:.2f} minus decode), "
                             f"hand-off {workers + other:.2f} (workers {workers:.2f} + other processes {other:.2f})")
        c = results.get("c") or []
        if c and not null:
            c1, b8, c8 = at(c, 1), at(levels, 8), at(c, 8)
            if b1 and c1:
                ok = b1.percentile(50) <= c1.percentile(50)
                lines.append(f"- {name}: lone-client p50 {b1.percentile(50):.1f} ms vs baseline {c1.percentile(50):.1f} "
                             f"(target: no worse): {'PASS' if ok else 'MISS'}")
            if b8 and c8:
                ok = b8.percentile(99) <= c8.percentile(99) and b8.throughput >= c8.throughput
                lines.append(f"- {name}: at concurrency 8 p99 {b8.percentile(99):.1f} ms at {b8.throughput:.1f} img/s vs "
                             f"baseline {c8.percentile(99):.1f} ms at {c8.throughput:.1f} img/s (target: p99 no worse at "
                             f"equal or better img/s): {'PASS' if ok else 'MISS'}")
            entry["vs_baseline"] = round(b_best.throughput / best(c).throughput, 3)
            if variant:
                ratio = entry["vs_baseline"]
                lines.append(f"- {name} (--model) over the baseline (--baseline-model), best concurrency each: "
                             f"{b_best.throughput:.1f} / {best(c).throughput:.1f} img/s = {ratio:.3f} (target >= "
                             f"{VARIANT_TARGET}): {'PASS' if ratio >= VARIANT_TARGET else 'MISS'}")
        summary[key] = entry
    return summary, lines


def gpu_replica_args(checkout: Path = REPO_ROOT) -> list[str]:
    """Flags that give a CPU server what `python -m serving` resolves for a CUDA device by default
    (serving/config.py): its workers, batch size and batch-fill wait, HTTP processes and the
    workers' scheduling policy (left out for an older `checkout` whose server lacks that flag)."""
    from serving.config import ServerConfig

    gpu = ServerConfig(model="-", no_auth=True).resolved("cuda")
    flags = ["--workers", str(gpu.workers), "--max-batch-size", str(gpu.max_batch_size),
             "--batch-timeout", str(gpu.batch_timeout), "--api-servers", str(gpu.api_servers)]
    config = checkout / "serving" / "config.py"
    if not config.is_file() or '"--worker-sched"' in config.read_text():
        flags += ["--worker-sched", gpu.worker_sched]
    return flags


# ------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=REPO_ROOT / "models" / "model.onnx")
    parser.add_argument("--baseline-model", type=Path, help="the model of the in-process ceiling (a) and the "
                        "seed-like baseline (c), e.g. the fp32 artifact while --model is its int8 variant "
                        "(default: --model)")
    parser.add_argument("--null", action="store_true", help="serve the null twin of --model (host overhead)")
    parser.add_argument("--concurrency", type=int, nargs="+", help="levels (default 1 4 8 16; --null: 1 8 16 32)")
    parser.add_argument("--duration", type=float, default=8.0, help="measured seconds per level")
    parser.add_argument("--warmup", type=float, default=1.5, help="unmeasured seconds before each level")
    parser.add_argument("--rounds", type=int, default=1, help="repeat every level; keep each system's best round")
    parser.add_argument("--wait-idle", type=float, default=0.0,
                        help="before each measurement wait up to this many seconds for the CPUs to be < 15%% busy")
    parser.add_argument("--images-dir", type=Path, action="append", default=[], help="more JPEG files")
    parser.add_argument("--max-images", type=int, default=200)
    parser.add_argument("--images-per-request", type=int, default=1,
                        help="multipart files per HTTP request (the per-request overhead is shared by them)")
    parser.add_argument("--server-args", default="", help="extra flags for python -m serving, e.g. '--workers 2'")
    parser.add_argument("--gpu-replica", action="store_true",
                        help="the servers (b, b0) run with the batching and process settings a CUDA device gets "
                        "by default, on the CPU (with --null: the host side of a GPU replica)")
    parser.add_argument("--compare", type=Path, help="also run the server of this checkout (system b0, same venv)")
    parser.add_argument("--compare-args", default="", help="extra flags for the --compare server")
    parser.add_argument("--only", default=None, help="systems to run, e.g. 'b' or 'ab' (default: abc, --null: ab)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    for flag, path in (("--model", args.model), ("--baseline-model", args.baseline_model)):
        if path is not None and not path.is_file():
            print(f"no model at {path}: export one (scripts/convert_to_onnx.py) or pass {flag}", file=sys.stderr)
            return 2
    bodies = jpeg_bodies(args.images_dir, args.max_images)
    if not bodies:
        print("no JPEG files found (data/images/*.jpg, --images-dir)", file=sys.stderr)
        return 2
    only = args.only or ("ab" if args.null else "abc")
    systems = [s for s in ("a", "b", "b0", "c") if (s == "b0" and args.compare) or (s != "b0" and s in only)]
    levels = args.concurrency or ([1, 8, 16, 32] if args.null else [1, 4, 8, 16])
    tmp = Path(tempfile.mkdtemp(prefix="onnxship-bench-"))
    model = args.model.resolve()
    baseline_model = (args.baseline_model or args.model).resolve()
    if args.null:
        from benchmarks.null_artifact import build_null_artifact

        model = baseline_model = build_null_artifact(model, tmp / "null.onnx")
    variant = baseline_model != model
    models = f"model {model}" + (f" (servers), baseline model {baseline_model} (a, c)" if variant else "")
    print(f"{len(bodies)} JPEG bodies, mean {np.mean([len(b) for b in bodies]) / 1024:.0f} KiB; {models}; "
          f"{os.cpu_count()} CPUs; {args.duration:g} s per level, {args.rounds} round(s); load {os.getloadavg()}")
    if args.gpu_replica:
        print(f"servers (b, b0) with the CUDA defaults on the CPU: {' '.join(gpu_replica_args())}")
    env = bench_env(BENCH_KEY)
    results: dict[str, list[Level]] = {s: [] for s in systems}
    servers, ports = {}, {}
    served: dict = {"a": {"file": baseline_model.name}, "c": {"file": baseline_model.name}}
    try:
        for key in systems:
            if key in ("b", "b0"):
                ports[key] = free_port()
                checkout = REPO_ROOT if key == "b" else args.compare.resolve()
                extra = (gpu_replica_args(checkout) if args.gpu_replica else []) + \
                    (args.server_args if key == "b" else args.compare_args).split()
                servers[key] = start_server(server_command(model, ports[key], extra), env, ports[key], "/ready",
                                            cwd=REPO_ROOT if key == "b" else args.compare.resolve())
                if key == "b":
                    served[key] = served_model(ports[key])
                    print(f"  {NAMES[key]} serves {served[key]['file']} (sha256 {served[key]['sha256'][:12]}), "
                          f"ready after {(served[key]['startup'] or {}).get('ready_after_s')} s", flush=True)
            elif key == "c":
                ports[key] = free_port()
                servers[key] = start_server([sys.executable, "-m", "benchmarks.baseline", "--model", str(baseline_model),
                                             "--port", str(ports[key])], env, ports[key], "/health")
        for _ in range(args.rounds):
            measured_a: set[int] = set()
            for concurrency in levels:
                for key in systems:
                    wait_for_quiet(args.wait_idle)
                    if key == "a":
                        if args.null:  # one process per client, one per core at most: each level once per round
                            processes = min(concurrency, os.cpu_count() or 1)
                            if processes in measured_a:
                                continue
                            measured_a.add(processes)
                            level = bench_in_process_processes(model, bodies, processes, args.duration, args.warmup)
                        else:
                            level = bench_in_process_threads(baseline_model, bodies, concurrency, args.duration,
                                                             args.warmup)
                    else:
                        headers = {} if key == "c" else {"X-API-Key": BENCH_KEY}
                        level = bench_http(NAMES[key], ports[key], "/predict", headers, bodies, concurrency,
                                           args.duration, args.warmup, pid=servers[key].pid,
                                           images_per_request=args.images_per_request if key != "c" else 1)
                    kept = at(results[key], level.concurrency)
                    if kept is None:
                        results[key].append(level)
                    elif level.throughput > kept.throughput:
                        results[key][results[key].index(kept)] = level
                    print(f"  {level.system:<24} c={concurrency:<3} {level.throughput:8.1f} img/s  "
                          f"p50 {level.percentile(50):7.2f} ms  errors {level.errors}", flush=True)
    finally:
        for process in servers.values():
            stop_server(process)
    summary, lines = summarize(results, args.null, args.images_per_request, variant)
    print()
    print("\n".join(table(results, args.null)))
    print()
    print("\n".join(lines))
    print(f"load average after the run: {os.getloadavg()}")
    if args.json:
        args.json.write_text(json.dumps({"levels": [lv.row() for k in results for lv in results[k]],
                                         "summary": summary, "models": {k: v for k, v in served.items() if k in results},
                                         "args": {k: str(v) for k, v in vars(args).items()}},
                                        indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
