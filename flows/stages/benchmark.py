"""Latency benchmark, in-process: ONNX Runtime on the artifact as deployed, plus PyTorch eager.

For every batch size: ORT with decode excluded (already-decoded uint8 tensors), ORT with decode
included (JPEG/PNG bytes -> serving.images.load_image -> ORT, what the server does per request),
and PyTorch eager on the same tensors (same normalisation, float32). Latency is per call (one
batch); throughput is images per second. A PNG plot shows both against batch size.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import psutil

from serving.runtime import Classifier

ENGINE_ORT = "onnxruntime"
ENGINE_ORT_DECODE = "onnxruntime+decode"
ENGINE_TORCH = "pytorch"
ENGINE_KEYS = {ENGINE_ORT: "ort", ENGINE_ORT_DECODE: "ort_decode", ENGINE_TORCH: "torch"}
MIN_CALLS = 5
BUSY_SHARE = 0.25  # other programs using more than this share of the machine make latency figures doubtful

Progress = Callable[[str, float], None]  # (what, fraction done 0..1)


@dataclass(frozen=True)
class LatencyRow:
    engine: str
    batch_size: int
    calls: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    throughput: float  # images / second

    @property
    def key(self) -> str:
        return f"{ENGINE_KEYS[self.engine]}_b{self.batch_size}"


@dataclass
class BenchmarkResult:
    rows: list[LatencyRow]
    providers: list[str]
    threads: int | None
    seconds: float
    others_cpu_share: float | None = None  # CPU other programs used meanwhile, share of all cores (OtherPrograms)

    def row(self, engine: str, batch_size: int) -> LatencyRow | None:
        return next((r for r in self.rows if r.engine == engine and r.batch_size == batch_size), None)

    def metrics(self) -> dict[str, float]:
        """MLflow metrics with stable, unit-suffixed keys: benchmark/ort_b1_p95_ms, benchmark/ort_decode_b4_img_per_s, ..."""
        out: dict[str, float] = {}
        for row in self.rows:
            prefix = f"benchmark/{row.key}"
            out.update({f"{prefix}_p50_ms": row.p50_ms, f"{prefix}_p95_ms": row.p95_ms, f"{prefix}_p99_ms": row.p99_ms,
                        f"{prefix}_img_per_s": row.throughput})
        if self.others_cpu_share is not None:
            out["benchmark/other_programs_cpu_pct"] = round(100.0 * self.others_cpu_share, 1)
        return out

    @property
    def machine_was_busy(self) -> bool:
        return (self.others_cpu_share or 0.0) > BUSY_SHARE

    def to_dict(self) -> dict:
        return {"rows": [asdict(r) for r in self.rows], "providers": self.providers, "threads": self.threads,
                "seconds": self.seconds, "others_cpu_share": self.others_cpu_share, "cores": psutil.cpu_count()}


class OtherPrograms:
    """The CPU that programs other than this one used since it was created, as a share of all cores.

    Latency figures taken while other programs compete for the cores are slower, and PyTorch's
    multi-threaded kernels far slower (its OpenMP threads wait for each other at every layer when one
    of them is descheduled: 2 busy processes on 2 cores made EfficientNet-Lite0 2.5 to 3x slower at
    2 threads, 1 thread unaffected), so the report says when figures were taken on a busy machine."""

    def __init__(self):
        self.process = psutil.Process()
        self.started = time.monotonic()
        self.machine_busy, self.own = self.machine_busy_s(), self.own_s()

    def share(self) -> float:
        wall = time.monotonic() - self.started
        others = (self.machine_busy_s() - self.machine_busy) - (self.own_s() - self.own)
        return round(min(1.0, max(0.0, others / (wall * (psutil.cpu_count() or 1)))), 3) if wall > 0 else 0.0

    @staticmethod
    def machine_busy_s() -> float:
        times = psutil.cpu_times()
        return sum(getattr(times, name, 0.0) for name in ("user", "nice", "system", "irq", "softirq", "steal"))

    def own_s(self) -> float:
        times = self.process.cpu_times()
        return times.user + times.system


def time_calls(call: Callable[[], object], duration_s: float, warmup_calls: int = 1, min_calls: int = MIN_CALLS) -> list[float]:
    """Run `call` for about `duration_s` seconds (at least `min_calls` times); per-call seconds."""
    for _ in range(warmup_calls):
        call()
    timings: list[float] = []
    deadline = time.perf_counter() + duration_s
    while len(timings) < min_calls or time.perf_counter() < deadline:
        start = time.perf_counter()
        call()
        timings.append(time.perf_counter() - start)
    return timings


def summarise(engine: str, batch_size: int, timings: Sequence[float]) -> LatencyRow:
    ms = np.asarray(timings) * 1000.0
    p50, p95, p99 = (float(v) for v in np.percentile(ms, [50, 95, 99]))
    return LatencyRow(engine, batch_size, len(timings), round(p50, 3), round(p95, 3), round(p99, 3),
                      round(batch_size / (p50 / 1000.0), 2))


def take(items: Sequence, count: int) -> list:
    return list(itertools.islice(itertools.cycle(items), count))


def benchmark_artifact(
    classifier: Classifier,
    image_paths: Sequence[Path],
    batch_sizes: Sequence[int] = (1, 4, 8),
    duration_s: float = 2.0,
    warmup_calls: int = 2,
    torch_module=None,
    progress: Progress | None = None,
) -> BenchmarkResult:
    """Benchmark the artifact's session (decode excluded and included) and, if given, the PyTorch module."""
    started, others = time.perf_counter(), OtherPrograms()
    meta = classifier.metadata
    encoded = [Path(p).read_bytes() for p in image_paths]
    if not encoded:
        raise ValueError("benchmark needs at least one image")
    decoded = [classifier.load_input(data) for data in encoded]
    steps = len(batch_sizes) * (3 if torch_module is not None else 2)
    done = 0
    rows: list[LatencyRow] = []

    def report(what: str) -> None:
        nonlocal done
        done += 1
        if progress:
            progress(what, done / steps)

    for batch_size in batch_sizes:
        batch = np.stack(take(decoded, batch_size))
        rows.append(summarise(ENGINE_ORT, batch_size, time_calls(lambda: classifier.predict(batch), duration_s, warmup_calls)))
        report(f"onnxruntime b{batch_size}")
        bodies = take(encoded, batch_size)

        def decode_and_predict() -> None:
            images = [classifier.load_input(body) for body in bodies]
            classifier.predict(np.stack(images))

        rows.append(summarise(ENGINE_ORT_DECODE, batch_size, time_calls(decode_and_predict, duration_s, warmup_calls)))
        report(f"onnxruntime+decode b{batch_size}")
    if torch_module is not None:
        for batch_size in batch_sizes:
            rows.append(benchmark_torch(torch_module, np.stack(take(decoded, batch_size)), meta.mean, meta.std,
                                        duration_s, warmup_calls))
            report(f"pytorch b{batch_size}")
    return BenchmarkResult(rows=rows, providers=list(classifier.providers), threads=classifier.intra_op_threads,
                           seconds=round(time.perf_counter() - started, 2), others_cpu_share=others.share())


def benchmark_torch(module, batch_uint8: np.ndarray, mean, std, duration_s: float, warmup_calls: int) -> LatencyRow:
    """PyTorch eager on the same uint8 NHWC batch, through the very preprocessing wrapper that export
    folds into the graph (flows.stages.export.fold_preprocessing)."""
    import torch

    from flows.stages.export import fold_preprocessing

    folded = fold_preprocessing(module, mean, std)
    images = torch.from_numpy(batch_uint8)

    def call() -> None:
        with torch.inference_mode():
            folded(images)

    return summarise(ENGINE_TORCH, batch_uint8.shape[0], time_calls(call, duration_s, warmup_calls))


def compare_latency(
    candidate: Classifier,
    champion: Classifier,
    image_paths: Sequence[Path],
    batch_size: int = 1,
    duration_s: float = 1.0,
    rounds: int = 6,
) -> tuple[float, float, float]:
    """p95 (ms, decode included) of candidate and champion, and how much slower the candidate is.

    Measured in `rounds` back-to-back pairs, the order flipping from pair to pair (AB BA AB ...); each
    pair gives a ratio of the two p95s and the result is the median ratio (and the median p95s). Other
    programs' load comes in bursts that a plain A-then-B comparison charges to one side (seen here:
    the same model measured +105% slower than itself); a burst spoils one pair, not the median.
    """
    models = [candidate, champion]
    bodies = take([Path(p).read_bytes() for p in image_paths], batch_size)
    p95s: list[list[float]] = [[], []]
    for pair in range(rounds):
        for index in (0, 1) if pair % 2 == 0 else (1, 0):
            model = models[index]

            def call(model=model) -> None:
                model.predict(np.stack([model.load_input(b) for b in bodies]))

            timings = time_calls(call, duration_s / rounds, warmup_calls=1)
            p95s[index].append(float(np.percentile(np.asarray(timings) * 1000.0, 95)))
    ratio = float(np.median([cand / champ for cand, champ in zip(*p95s)]))
    return round(float(np.median(p95s[0])), 3), round(float(np.median(p95s[1])), 3), round(ratio, 4)


def paired_speedup(baseline: Classifier, variant: Classifier, image_paths: Sequence[Path], duration_s: float = 3.0,
                   min_pairs: int = 20) -> float:
    """How many times faster `variant` computes than `baseline` at batch 1, decode excluded: calls alternate
    one by one (the order flipping from pair to pair), so a burst of other programs' load falls on both
    calls of a pair; the result is the median of the per-pair time ratios."""
    batch = baseline.load_input(Path(image_paths[0]).read_bytes())[None]
    for model in (baseline, variant):
        model.predict(batch)

    def timed(model) -> float:
        started = time.perf_counter()
        model.predict(batch)
        return time.perf_counter() - started

    ratios: list[float] = []
    deadline = time.perf_counter() + duration_s
    while len(ratios) < min_pairs or time.perf_counter() < deadline:
        if len(ratios) % 2:
            variant_s, baseline_s = timed(variant), timed(baseline)
        else:
            baseline_s, variant_s = timed(baseline), timed(variant)
        ratios.append(baseline_s / variant_s)
    return round(float(np.median(ratios)), 3)


def plot_benchmark(result: BenchmarkResult, path: Path, title: str = "",
                   variants: dict[str, BenchmarkResult] | None = None) -> Path:
    """Two panels (PNG, matplotlib Agg): ONNX Runtime latency per call as p50 bars with p95 whiskers per
    batch size, value on each bar; throughput of every engine, PyTorch included. PyTorch stays out of
    the latency panel: its occasional second-long calls would flatten the ONNX Runtime bars to zero.
    `variants` (precision -> its result) adds each reduced-precision artifact's ONNX Runtime figures."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sizes = sorted({r.batch_size for r in result.rows})
    suffix = " fp32" if variants else ""
    latency_series = [(f"{e}{suffix}", result, e) for e in (ENGINE_ORT, ENGINE_ORT_DECODE)
                      if any(r.engine == e for r in result.rows)]
    latency_series += [(f"{ENGINE_ORT} {precision}", other, ENGINE_ORT) for precision, other in (variants or {}).items()]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / max(1, len(latency_series))
    for index, (label, source, engine) in enumerate(latency_series):
        rows = [source.row(engine, size) for size in sizes]
        xs = [i + (index - (len(latency_series) - 1) / 2) * width for i in range(len(sizes))]
        p50 = [r.p50_ms if r else 0 for r in rows]
        whisker = [(r.p95_ms - r.p50_ms) if r else 0 for r in rows]
        bars = left.bar(xs, p50, width * 0.9, yerr=[[0] * len(rows), whisker], capsize=4, label=f"{label} (p50, p95)")
        left.bar_label(bars, labels=[f"{v:.1f}" for v in p50], fontsize=8, padding=2)
    left.set_xticks(range(len(sizes)), [str(size) for size in sizes])
    left.set(xlabel="batch size", ylabel="ms per call", title="ONNX Runtime latency per call")
    throughput_series = [(e + (suffix if e != ENGINE_TORCH else ""), result, e)
                         for e in (ENGINE_ORT, ENGINE_ORT_DECODE, ENGINE_TORCH)]
    throughput_series += [(f"{e} {precision}", other, e) for precision, other in (variants or {}).items()
                          for e in (ENGINE_ORT, ENGINE_ORT_DECODE)]
    for label, source, engine in throughput_series:
        rows = sorted((r for r in source.rows if r.engine == engine), key=lambda r: r.batch_size)
        if rows:
            right.plot([r.batch_size for r in rows], [r.throughput for r in rows], marker="o", label=label)
    right.set(xlabel="batch size", ylabel="images / s", title="throughput (p50 call)")
    right.set_xticks(sizes)
    for axis in (left, right):
        axis.grid(alpha=0.3, axis="y")
        axis.legend(fontsize=8)
    fig.suptitle(title or "onnxship benchmark")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
