"""What a person reads: the release's progress lines, its markdown artifact (Prefect UI, MLflow run)
and the console summary. Built from a `ReleaseSummary`, filled in stage by stage by flows/release.py."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

from flows.stages.benchmark import BUSY_SHARE, ENGINE_ORT, ENGINE_ORT_DECODE, ENGINE_TORCH

STAGES = ("validate", "export", "simplify", "parity", "variants", "benchmark", "register", "gate", "deploy", "smoke test", "promote")
CONSOLE = False  # True when run from the command line: progress goes to stdout instead of the Prefect log


def say(message: str) -> None:
    if CONSOLE:
        print(message, flush=True)
        return
    try:
        from prefect import get_run_logger

        get_run_logger().info(message)
    except Exception:
        print(message, flush=True)


class Stages:
    """Progress output: `[3/10] parity ...` then `done in 1.2 s`; timings kept for the report."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}
        self.current: str | None = None

    @contextmanager
    def run(self, name: str):
        index = STAGES.index(name) + 1
        self.current = name
        say(f"[{index}/{len(STAGES)}] {name} ...")
        started = time.perf_counter()
        try:
            yield
        except BaseException:
            self.timings[name] = round(time.perf_counter() - started, 2)
            say(f"[{index}/{len(STAGES)}] {name} FAILED after {self.timings[name]:.1f} s")
            raise
        self.timings[name] = round(time.perf_counter() - started, 2)
        say(f"[{index}/{len(STAGES)}] {name} done in {self.timings[name]:.1f} s")


def progress_printer(prefix: str):
    last = [0.0]

    def show(what: str, fraction: float) -> None:
        width = 24
        filled = int(round(fraction * width))
        line = f"      {prefix} [{'#' * filled}{'.' * (width - filled)}] {fraction:4.0%} {what}"
        if CONSOLE and sys.stdout.isatty():
            print("\r" + line.ljust(90), end="" if fraction < 1 else "\n", flush=True)
        elif fraction >= 1 or time.monotonic() - last[0] > 5:
            say(line)
            last[0] = time.monotonic()

    return show


@dataclass
class ReleaseSummary:
    model_name: str
    target: str
    tracking_uri: str
    outcome: str = "running"  # promoted | rejected | failed
    failed_stage: str | None = None
    error: str | None = None
    version: str | None = None
    run_id: str | None = None
    run_link: str | None = None
    experiment_id: str | None = None
    previous_champion: str | None = None
    verdict: str | None = None  # pass | fail
    reasons: list[str] = field(default_factory=list)
    parity: dict | None = None
    accuracy: dict | None = None
    benchmark: dict | None = None
    nodes: tuple[int, int] | None = None
    simplify_error: str | None = None
    endpoint_url: str | None = None
    api_key_masked: str | None = None  # never the key itself: summaries end up in Prefect's logs
    api_key_source: str | None = None  # "env API_KEY" | "Prefect Secret ..." | "state" | "generated"
    api_key_command: str | None = None  # the command that prints the key, where the target keeps one
    state_file: str | None = None
    stop_hint: str | None = None
    smoke: dict | None = None
    timings: dict[str, float] = field(default_factory=dict)
    plot_path: str | None = None
    variants: list[dict] | None = None  # one row per precision (flows.record.log_variant_runs)
    variant_images: str | None = None  # where the evaluation and calibration images came from

    def record_endpoint(self, endpoint) -> None:
        """Where the release now serves (a flows.deploy.Endpoint); the key itself is shown only when generated."""
        from flows.secrets import masked

        self.endpoint_url = endpoint.url
        self.api_key_masked = masked(endpoint.api_key) if endpoint.api_key else None
        self.api_key_source = endpoint.details.get("api_key_source")
        self.api_key_command = endpoint.details.get("api_key_command")
        self.state_file = endpoint.details.get("state_file")
        self.stop_hint = endpoint.stop_hint

    @property
    def title(self) -> str:
        version = f" v{self.version}" if self.version else ""
        status = {"promoted": "PROMOTED to @champion", "rejected": "REJECTED by the gate",
                  "failed": f"FAILED at {self.failed_stage}"}.get(self.outcome, self.outcome)
        return f"{self.model_name}{version}: {status}"


def pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def latency_table(benchmark: dict) -> list[str]:
    rows = benchmark.get("rows", [])
    by = {(r["engine"], r["batch_size"]): r for r in rows}
    lines = ["| batch | ORT p50 / p95 / p99 ms | ORT img/s | ORT+decode p50 / p95 ms | ORT+decode img/s "
             "| PyTorch p50 ms | PyTorch img/s |", "|---:|---|---:|---|---:|---:|---:|"]
    for size in sorted({r["batch_size"] for r in rows}):
        ort, dec, pt = by.get((ENGINE_ORT, size)), by.get((ENGINE_ORT_DECODE, size)), by.get((ENGINE_TORCH, size))
        cells = [str(size)]
        cells += [f"{ort['p50_ms']:.1f} / {ort['p95_ms']:.1f} / {ort['p99_ms']:.1f}", f"{ort['throughput']:.0f}"] if ort else ["-", "-"]
        cells += [f"{dec['p50_ms']:.1f} / {dec['p95_ms']:.1f}", f"{dec['throughput']:.0f}"] if dec else ["-", "-"]
        cells += [f"{pt['p50_ms']:.1f}", f"{pt['throughput']:.0f}"] if pt else ["-", "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def busy_machine_line(benchmark: dict) -> str:
    """A warning when other programs competed for the CPU while the benchmark measured ("" otherwise)."""
    share = benchmark.get("others_cpu_share")
    if share is None or share <= BUSY_SHARE:
        return ""
    return (f"other programs used {share:.0%} of this machine's {benchmark.get('cores') or '?'} cores while it "
            "measured: latencies include their interference (PyTorch's most: its threads wait for each other)")


def variant_table(rows: list[dict]) -> list[str]:
    """Every variant side by side: speed, agreement with PyTorch, accuracy, size, and the gate's verdict."""
    def num(value, fmt: str) -> str:
        return "-" if value is None or value != value else format(value, fmt)

    lines = ["| precision | ORT img/s (b1) | speed-up | top-1 agreement | top-5 agreement | top-1 accuracy "
             "| size MB | verdict |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        why = f": {r['why']}" if r.get("why") else ""
        lines.append(f"| {r['precision']} | {num(r.get('ort_b1_img_per_s'), '.0f')} | {num(r.get('speedup'), '.2f')}x "
                     f"| {num(r.get('top1_agreement'), '.1%')} | {num(r.get('top5_agreement'), '.1%')} "
                     f"| {num(r.get('top1_accuracy'), '.1%')} | {num(r.get('size_mb'), '.1f')} | {r['verdict']}{why} |")
    return lines


def build_markdown(s: ReleaseSummary) -> str:
    icon = {"promoted": "✅", "rejected": "⛔", "failed": "❌"}.get(s.outcome, "⏳")
    lines = [f"# {icon} {s.title}", ""]
    verdict = (s.verdict or "not reached").upper()
    failures = [r for r in s.reasons if r.startswith("FAIL")]
    lines.append(f"**Gate: {verdict}**" + (f" — {'; '.join(f[6:] for f in failures)}" if failures else ""))
    if s.error:
        lines += ["", f"**Error ({s.failed_stage}):** {s.error}"]
    lines += ["", "| | |", "|---|---|"]
    lines.append(f"| endpoint | {s.endpoint_url or 'not deployed'} ({s.target}) |")
    if s.smoke:
        m = s.smoke.get("metrics", {})
        lines.append(f"| smoke test | {'passed' if s.smoke.get('passed') else 'FAILED'}, {int(m.get('smoke/images_count', 0))} images, "
                     f"max {m.get('smoke/latency_max_ms', 0):.0f} ms |")
    lines.append(f"| MLflow run | {f'[{s.run_id[:8]}]({s.run_link})' if s.run_id else '-'} |")
    lines.append(f"| previous champion | {('v' + s.previous_champion) if s.previous_champion else 'none'} |")
    if s.accuracy:
        lines.append(f"| reference accuracy | {s.accuracy['correct']}/{s.accuracy['total']} top-1 ({pct(s.accuracy['top1'])}) |")
    if s.nodes:
        extra = f" (onnxsim failed: {s.simplify_error})" if s.simplify_error else ""
        lines.append(f"| graph nodes | {s.nodes[0]} -> {s.nodes[1]}{extra} |")
    if s.reasons:
        lines += ["", "### Gate checks", ""] + [f"- {r}" for r in s.reasons]
    if s.variants:
        lines += ["", "### Variants (the gate ships the chosen one)", "", f"Images: {s.variant_images}.", ""]
        lines += variant_table(s.variants)
    if s.parity:
        p = s.parity
        lines += ["", f"### Parity: PyTorch vs ONNX Runtime ({p['images']} images, batch sizes "
                      f"{', '.join(map(str, p['batch_sizes']))})", "",
                  "| top-1 agreement | top-5 agreement | max abs prob diff | max abs logit diff |", "|---|---|---|---|",
                  f"| {pct(p['top1_agreement'])} | {pct(p['top5_agreement'])} | {p['max_abs_prob_diff']:.2e} | {p['max_abs_logit_diff']:.2e} |"]
    if s.benchmark and s.benchmark.get("rows"):
        lines += ["", f"### Latency per call, in-process ({', '.join(s.benchmark.get('providers', []))})", ""]
        lines += latency_table(s.benchmark)
        if busy_machine_line(s.benchmark):
            lines += ["", f"> {busy_machine_line(s.benchmark)}"]
    if s.timings:
        lines += ["", "Stages: " + " · ".join(f"{name} {sec:.1f} s" for name, sec in s.timings.items())]
    return "\n".join(lines) + "\n"


def api_key_lines(s: ReleaseSummary) -> list[str]:
    """Where the key comes from and how to use it, never the key itself."""
    if not s.api_key_masked:
        return []
    where = {"generated": f"generated, kept in {s.state_file} (mode 0600)",
             "state": f"reused from {s.state_file}"}.get(s.api_key_source or "", f"from {s.api_key_source}")
    lines = [f" api key    {s.api_key_masked}, {where}"]
    prefix = ""
    if s.api_key_command:
        lines.append(f"            print it: {s.api_key_command}")
        if s.api_key_source in ("generated", "state"):
            prefix = f"API_KEY=$({s.api_key_command.replace('make ', 'make -s ', 1)}) "
    lines.append(f" try it     {prefix}.venv/bin/python scripts/test_server.py --url {s.endpoint_url} "
                 "--images data/images/chelsea.png")
    return lines


def build_console(s: ReleaseSummary, prefect_ui: str | None) -> str:
    from flows.registry import ui_command

    bar = "=" * 78
    lines = [bar, f" onnxship release · {s.title}", bar]
    lines.append(f" verdict    {(s.verdict or 'not reached').upper()}")
    for reason in s.reasons:
        lines.append(f"            {reason}")
    if s.error:
        lines.append(f" error      [{s.failed_stage}] {s.error}")
    figures = []
    if s.parity:
        figures.append(f"parity top-1 {pct(s.parity['top1_agreement'])}, max prob diff {s.parity['max_abs_prob_diff']:.1e}")
    if s.accuracy:
        figures.append(f"reference accuracy {s.accuracy['correct']}/{s.accuracy['total']}")
    if s.benchmark:
        rows = {(r["engine"], r["batch_size"]): r for r in s.benchmark.get("rows", [])}
        b1, b1d = rows.get((ENGINE_ORT, 1)), rows.get((ENGINE_ORT_DECODE, 1))
        if b1 and b1d:
            figures.append(f"ORT batch-1 p50/p95 {b1['p50_ms']:.1f}/{b1['p95_ms']:.1f} ms "
                           f"(with decode {b1d['p50_ms']:.1f}/{b1d['p95_ms']:.1f} ms)")
        best = max((r for r in s.benchmark.get("rows", []) if r["engine"] == ENGINE_ORT), key=lambda r: r["throughput"], default=None)
        if best:
            figures.append(f"best ORT throughput {best['throughput']:.0f} img/s at batch {best['batch_size']}")
        if busy_machine_line(s.benchmark):
            figures.append(f"note: {busy_machine_line(s.benchmark)}")
    for row in s.variants or []:
        figures.append(f"{row['precision']}: {row['verdict']}" + (f" ({row['why']})" if row.get("why") else ""))
    for index, figure in enumerate(figures):
        lines.append(f" {'figures' if index == 0 else '':10} {figure}")
    if s.endpoint_url:
        lines.append(f" endpoint   {s.endpoint_url}  ({s.target})")
        lines += api_key_lines(s)
    if s.run_link:
        lines.append(f" MLflow     {ui_command(s.tracking_uri)}")
        lines.append(f"            then open {s.run_link}")
    if prefect_ui:
        lines.append(f" Prefect    {prefect_ui}")
    else:
        lines.append(" Prefect    this run used a temporary Prefect API; to keep runs and the markdown artifact:")
        lines.append("            make prefect-server   # then: export PREFECT_API_URL=http://127.0.0.1:4200/api")
    if s.stop_hint:
        lines.append(f" stop       {s.stop_hint}")
    if s.timings:
        lines.append(" stages     " + " · ".join(f"{n} {t:.1f}s" for n, t in s.timings.items()))
    lines.append(bar)
    return "\n".join(lines)
