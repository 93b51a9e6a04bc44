"""The release flow: one Prefect task per stage, in the order a model travels.

    validate -> export -> simplify -> parity -> benchmark -> register -> gate -> deploy -> smoke test -> promote

`make release` runs it with the defaults (Prefect without a server, MLflow in mlruns/, the local
target on 127.0.0.1:8192); `prefect deployment run 'release/local'` runs it on a worker.
Nothing moves `@champion` unless the gate, the deploy and the smoke test all passed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

if __name__ == "__main__":  # the console shows our stage lines; Prefect's own INFO lines are noise there
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "CRITICAL")

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows import registry
from flows.benchmark import ENGINE_ORT_DECODE, BenchmarkResult, benchmark_artifact, plot_benchmark
from flows.deploy import Endpoint, deploy
from flows.gate import CandidateFigures, GateVerdict, compare_with_champion, evaluate_gate
from flows.params import ParameterError, ReleaseParams, load_references, validate_release_params
from flows.report import ReleaseSummary, build_console, build_markdown
from flows.smoke import SMOKE_METRIC_KEYS, SmokeResult, SmokeTestFailed, run_smoke_test

STAGES = ("validate", "export", "simplify", "parity", "benchmark", "register", "gate", "deploy", "smoke test", "promote")
CONSOLE = False  # True when run from the command line: progress goes to stdout instead of the Prefect log


class ReleaseFailed(RuntimeError):
    """A stage failed or the gate rejected the candidate; the message is the release summary."""


class GateRejected(ReleaseFailed):
    pass


def say(message: str) -> None:
    if CONSOLE:
        print(message, flush=True)
    else:
        try:
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


# ---------------------------------------------------------------- stages (one Prefect task each)

@task(name="export", timeout_seconds=900, cache_policy=NO_CACHE)
def export_stage(params: ReleaseParams, output: Path):
    from flows.export import DEFAULT_OPSET, export_onnx
    from flows.models import load_model

    loaded = load_model(params.arch, params.weights, random_init=params.random_init)
    exported = export_onnx(loaded, output, resize_policy=params.resize_policy, opset=params.opset or DEFAULT_OPSET)
    return loaded, exported


@task(name="simplify", timeout_seconds=600, cache_policy=NO_CACHE)
def simplify_stage(raw: Path, output: Path):
    from flows.simplify import simplify_onnx

    return simplify_onnx(raw, output)


@task(name="parity", timeout_seconds=600, cache_policy=NO_CACHE)
def parity_stage(loaded, onnx_path: Path, references, params: ReleaseParams):
    from flows.accuracy import measure_accuracy
    from flows.parity import ParityTolerances, check_parity

    tolerances = ParityTolerances(params.parity.min_top1_agreement, params.parity.max_prob_diff)
    parity = check_parity(loaded, onnx_path, references, batch_sizes=params.parity.batch_sizes, tolerances=tolerances)
    return parity, measure_accuracy(onnx_path, references)


@task(name="benchmark", timeout_seconds=1800, cache_policy=NO_CACHE)
def benchmark_stage(onnx_path: Path, references, params: ReleaseParams, loaded, plot_path: Path) -> BenchmarkResult:
    settings = params.benchmark
    result = benchmark_artifact(
        onnx_path, [r.path for r in references], settings.batch_sizes, settings.duration_s, settings.warmup_calls,
        settings.threads, torch_module=loaded.module if settings.include_torch else None,
        progress=progress_printer("benchmark"),
    )
    plot_benchmark(result, plot_path, title=f"{params.model_name} ({params.arch}), CPU, in-process")
    return result


@task(name="register", timeout_seconds=600, cache_policy=NO_CACHE)
def register_stage(params: ReleaseParams, onnx_path: Path, run_params: dict, metrics: dict,
                   artifacts: dict[str, Path | str | dict], workdir: Path):
    """One MLflow run with the same keys every release; the ONNX model logged and registered."""
    client = registry.connect(params.tracking_uri)
    experiment_id = registry.ensure_experiment(client, params.experiment or params.model_name)
    run_id = registry.start_run(client, experiment_id, f"release {time.strftime('%Y-%m-%d %H:%M:%S')}",
                                {"onnxship.release": "true", "target": params.target, "git_commit": run_params["git_commit"]})
    try:
        registry.log_params(client, run_id, run_params)
        registry.log_metrics(client, run_id, metrics)
        for name, content in artifacts.items():
            if isinstance(content, dict):
                client.log_dict(run_id, content, name)
            elif isinstance(content, Path):
                client.log_artifact(run_id, str(content), artifact_path=name)
            else:
                client.log_text(run_id, content, name)
        tags = {"arch": params.arch, "weights_sha256": str(run_params["weights_sha256"]), "git_commit": run_params["git_commit"],
                "gate.verdict": "pending"}
        registered = registry.register_release(client, params.model_name, experiment_id, run_id, onnx_path, tags)
    except BaseException:
        registry.end_run(client, run_id, "FAILED")
        raise
    # what gate, deploy and smoke test use is the registered file itself, fetched back from the registry
    local = registry.download_version(client, params.model_name, registered.version, workdir / f"registered-v{registered.version}")
    from serving.artifact import file_sha256

    if file_sha256(local) != registered.sha256:
        raise registry.RegistryError(f"models:/{params.model_name}/{registered.version} does not match the validated file")
    return registered, local, registry.run_link(client, experiment_id, run_id)


@task(name="gate", timeout_seconds=900, cache_policy=NO_CACHE)
def gate_stage(params: ReleaseParams, registered, candidate_path: Path, figures: CandidateFigures, references,
               workdir: Path) -> GateVerdict:
    client = registry.connect(params.tracking_uri)
    champion = registry.alias_version(client, params.model_name, registry.CHAMPION)
    comparison = None
    if champion is not None and champion != registered.version:
        champion_path = registry.download_version(client, params.model_name, champion, workdir / f"champion-v{champion}")
        duration = max(0.3, min(3.0, params.benchmark.duration_s))
        comparison = compare_with_champion(candidate_path, champion_path, champion, references, duration_s=duration,
                                           threads=params.benchmark.threads)
    verdict = evaluate_gate(figures, params.gate, params.parity, comparison)
    registry.tag_version(client, params.model_name, registered.version, verdict.tags())
    registry.log_metrics(client, registered.run_id, verdict.metrics())
    return verdict


@task(name="deploy", retries=1, retry_delay_seconds=5, timeout_seconds=3600, cache_policy=NO_CACHE)
def deploy_stage(params: ReleaseParams, artifact: Path, version: str, run_id: str) -> Endpoint:
    return deploy(params.target, artifact, params, model_name=params.model_name, version=version, run_id=run_id)


@task(name="smoke test", retries=2, retry_delay_seconds=3, timeout_seconds=600, cache_policy=NO_CACHE)
def smoke_stage(endpoint: Endpoint, references, params: ReleaseParams, artifact: Path) -> SmokeResult:
    """The endpoint must answer, within budget, exactly the classes the validated artifact gives in-process."""
    result = run_smoke_test(endpoint.url, endpoint.api_key, expected_from(artifact, references),
                            params.smoke.latency_budget_s, gateway_token=endpoint.gateway_token,
                            timeout_s=params.smoke.timeout_s, min_accuracy=1.0)
    if not result.passed:
        raise SmokeTestFailed(f"smoke test of {endpoint.url} failed: " + "; ".join(result.failures))
    return result


def expected_from(artifact: Path, references) -> list:
    from dataclasses import replace

    import numpy as np

    from serving.runtime import Classifier

    classifier = Classifier(artifact, device="cpu")
    probabilities = classifier.predict(np.stack([classifier.load_input(r.path) for r in references]))
    labels = classifier.metadata.labels
    return [replace(ref, expected_class=int(row.argmax()), label=labels[int(row.argmax())])
            for ref, row in zip(references, probabilities)]


@task(name="promote", timeout_seconds=120, cache_policy=NO_CACHE)
def promote_stage(params: ReleaseParams, version: str) -> str | None:
    client = registry.connect(params.tracking_uri)
    return registry.promote(client, params.model_name, version)


# ---------------------------------------------------------------- the flow

@flow(name="release", timeout_seconds=4 * 3600)
def release(params: ReleaseParams = ReleaseParams()) -> dict:
    """Export, validate, register, gate, deploy and smoke-test a model; promote it if all pass."""
    stages = Stages()
    tracking_uri = registry.resolve_tracking_uri(params.tracking_uri)
    summary = ReleaseSummary(model_name=params.model_name, target=params.target, tracking_uri=tracking_uri)
    with stages.run("validate"):
        for note in validate_release_params(params):
            say(f"      note: {note}")
        references = load_references(params)
    workdir = Path(params.output_dir) / "release"
    workdir.mkdir(parents=True, exist_ok=True)
    registered = None
    try:
        with stages.run("export"):
            loaded, exported = export_stage(params, workdir / "model.raw.onnx")
        with stages.run("simplify"):
            simplified = simplify_stage(exported.path, workdir / "model.onnx")
            summary.nodes, summary.simplify_error = (simplified.nodes_before, simplified.nodes_after), simplified.error
        with stages.run("parity"):
            parity, accuracy = parity_stage(loaded, simplified.path, references, params)
            summary.parity, summary.accuracy = parity.to_dict(), accuracy.to_dict()
            say(f"      {parity.summary()}; reference accuracy {accuracy.correct}/{accuracy.total}")
        with stages.run("benchmark"):
            bench = benchmark_stage(simplified.path, references, params, loaded, workdir / "benchmark.png")
            summary.benchmark, summary.plot_path = bench.to_dict(), str(workdir / "benchmark.png")
        del loaded
        with stages.run("register"):
            meta = exported.metadata
            run_params = release_run_params(params, meta, simplified)
            metrics = release_metrics(exported, simplified, parity, accuracy, bench, stages.timings)
            artifacts = {"parity_report.json": parity.to_dict(), "accuracy.json": accuracy.to_dict(),
                         "benchmark.json": bench.to_dict(), "benchmark": workdir / "benchmark.png",
                         "model_card.md": model_card(params, meta, parity, accuracy, bench, simplified)}
            registered, candidate_path, summary.run_link = register_stage(params, simplified.path, run_params, metrics,
                                                                          artifacts, workdir)
            summary.version, summary.run_id, summary.experiment_id = registered.version, registered.run_id, registered.experiment_id
            say(f"      registered models:/{params.model_name}/{registered.version} (@candidate), run {registered.run_id}")
        with stages.run("gate"):
            b1 = bench.row(ENGINE_ORT_DECODE, 1)
            figures = CandidateFigures(parity.top1_agreement, parity.max_abs_prob_diff, accuracy.top1, accuracy.correct,
                                       accuracy.total, b1.p95_ms)
            verdict = gate_stage(params, registered, candidate_path, figures, references, workdir)
            summary.verdict, summary.reasons = verdict.verdict, verdict.reasons
            summary.previous_champion = verdict.comparison.champion_version if verdict.comparison else None
            for reason in verdict.reasons:
                say(f"      {reason}")
            if not verdict.passed:
                summary.outcome = "rejected"
                raise GateRejected(f"gate rejected v{registered.version}: " + "; ".join(verdict.failures))
        with stages.run("deploy"):
            endpoint = deploy_stage(params, candidate_path, registered.version, registered.run_id)
            summary.endpoint_url, summary.api_key = endpoint.url, endpoint.api_key
            summary.api_key_source = endpoint.details.get("api_key_source")
            summary.state_file = endpoint.details.get("state_file")
            summary.stop_hint = endpoint.stop_hint
            say(f"      serving at {endpoint.url}")
        with stages.run("smoke test"):
            try:
                smoke = smoke_stage(endpoint, references, params, candidate_path)
            except SmokeTestFailed:
                restore_champion(params, summary)
                raise
            summary.smoke = smoke.to_dict()
        with stages.run("promote"):
            summary.previous_champion = promote_stage(params, registered.version)
            summary.outcome = "champion"
    except BaseException as error:
        if summary.outcome == "running":
            summary.outcome = "failed"
        summary.failed_stage = stages.current
        if not isinstance(error, GateRejected):
            summary.error = f"{type(error).__name__}: {error}"
        finish(params, summary, registered, stages)
        raise ReleaseFailed(f"release {summary.title}" + (f": {summary.error}" if summary.error else "")) from error
    finish(params, summary, registered, stages)
    return {"outcome": summary.outcome, "version": summary.version, "run_id": summary.run_id,
            "verdict": summary.verdict, "reasons": summary.reasons, "endpoint": summary.endpoint_url,
            "previous_champion": summary.previous_champion, "timings": summary.timings}


def restore_champion(params: ReleaseParams, summary: ReleaseSummary) -> None:
    """After a failed smoke test, redeploy the current champion so that it, not the rejected
    candidate, serves (on the local port, or as a new Cerebrium build of the champion)."""
    client = registry.connect(params.tracking_uri)
    champion = registry.alias_version(client, params.model_name, registry.CHAMPION)
    if champion is None:
        return
    try:
        path = registry.download_version(client, params.model_name, champion, Path(params.output_dir) / "release" / f"champion-v{champion}")
        endpoint = deploy(params.target, path, params, model_name=params.model_name, version=champion)
        say(f"      smoke test failed: restored champion v{champion} at {endpoint.url}")
    except Exception as error:
        say(f"      smoke test failed and restoring champion v{champion} failed too: {error}")


def finish(params: ReleaseParams, summary: ReleaseSummary, registered, stages: Stages) -> None:
    """Record the outcome everywhere a person looks: version tags, MLflow run, Prefect artifact, console."""
    summary.timings = dict(stages.timings)
    markdown = build_markdown(summary)
    if registered is not None:
        client = registry.connect(params.tracking_uri)
        tags = {"release.outcome": summary.outcome}
        if summary.endpoint_url:
            tags["deploy.url"] = summary.endpoint_url
            tags["deploy.target"] = params.target
        if summary.smoke is not None or summary.outcome == "failed" and summary.failed_stage == "smoke test":
            tags["smoke.passed"] = str(bool(summary.smoke and summary.smoke.get("passed"))).lower()
        if summary.outcome == "failed" and summary.verdict == "pass" and summary.failed_stage:
            tags["release.failed_stage"] = summary.failed_stage
        try:
            registry.tag_version(client, params.model_name, registered.version, tags)
            registry.log_metrics(client, registered.run_id, {f"stage_{k.replace(' ', '_')}_s": v for k, v in summary.timings.items()})
            smoke_metrics = summary.smoke["metrics"] if summary.smoke else dict.fromkeys(SMOKE_METRIC_KEYS, math.nan)
            registry.log_metrics(client, registered.run_id, smoke_metrics)
            client.set_tag(registered.run_id, "release.outcome", summary.outcome)
            client.log_text(registered.run_id, markdown, "release_report.md")
            registry.end_run(client, registered.run_id, "FINISHED" if summary.outcome == "champion" else "FAILED")
        except Exception as error:
            say(f"      warning: could not record the outcome in MLflow: {error}")
    (Path(params.output_dir) / "release" / "report.md").write_text(markdown)
    try:
        create_markdown_artifact(markdown, key=artifact_key(params.model_name),
                                 description=f"release of {params.model_name}: {summary.outcome}")
    except Exception as error:
        say(f"      warning: could not create the Prefect artifact: {error}")
    say(build_console(summary, prefect_ui_hint()))


def artifact_key(model_name: str) -> str:
    return "release-" + "".join(c if c.isalnum() or c == "-" else "-" for c in model_name.lower())


def prefect_ui_hint() -> str | None:
    from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL

    api = PREFECT_API_URL.value()
    if not api or "ephemeral" in str(api):
        return None
    try:
        from prefect.runtime import flow_run

        ui = PREFECT_UI_URL.value() or api.rstrip("/").removesuffix("/api")
        return f"{ui}/runs/flow-run/{flow_run.id}"
    except Exception:
        return None


def release_run_params(params: ReleaseParams, meta, simplified) -> dict:
    """The same keys on every release, so MLflow's Compare view lines versions up."""
    import onnxruntime
    import torch

    return {
        "arch": meta.arch, "weights": str(params.weights or "bundled default"), "weights_sha256": meta.weights_sha256,
        "opset": meta.opset, "input_size": meta.input_size, "resize_policy": meta.resize_policy, "layout": meta.layout,
        "num_classes": meta.num_classes, "onnxship_version": meta.onnxship_version, "git_commit": registry.git_commit(),
        "simplified": simplified.simplified, "target": params.target, "model_name": params.model_name,
        "benchmark_batch_sizes": ",".join(map(str, params.benchmark.batch_sizes)),
        "benchmark_duration_s": params.benchmark.duration_s,
        "parity_min_top1_agreement": params.parity.min_top1_agreement,
        "parity_max_prob_diff": params.parity.max_prob_diff,
        "gate_min_accuracy": params.gate.min_accuracy, "gate_max_p95_latency_ms": params.gate.max_p95_latency_ms,
        "gate_max_accuracy_drop": params.gate.max_accuracy_drop,
        "gate_max_latency_regression_pct": params.gate.max_latency_regression_pct,
        "onnxruntime_version": onnxruntime.__version__, "torch_version": torch.__version__,
    }


def release_metrics(exported, simplified, parity, accuracy, bench: BenchmarkResult, timings: dict) -> dict:
    metrics = {
        "nodes_exported": exported.node_count, "nodes_before_simplify": simplified.nodes_before,
        "nodes_after_simplify": simplified.nodes_after, "export_s": exported.seconds, "simplify_s": simplified.seconds,
        "parity_top1_agreement": parity.top1_agreement, "parity_top5_agreement": parity.top5_agreement,
        "parity_max_abs_prob_diff": parity.max_abs_prob_diff, "parity_max_abs_logit_diff": parity.max_abs_logit_diff,
        "reference_accuracy": accuracy.top1, "reference_top5": accuracy.top5,
        "reference_correct": accuracy.correct, "reference_total": accuracy.total,
    }
    metrics.update(bench.metrics())
    return metrics


def model_card(params: ReleaseParams, meta, parity, accuracy, bench: BenchmarkResult, simplified) -> str:
    b1 = bench.row(ENGINE_ORT_DECODE, 1)
    return "\n".join([
        f"# Model card: {params.model_name}",
        "",
        f"- Architecture: `{meta.arch}`, {meta.num_classes} classes (ImageNet label names), input {meta.input_size}x{meta.input_size}",
        f"- Weights: {params.weights or 'bundled pretrained default'} (sha256 `{meta.weights_sha256}`)",
        f"- ONNX opset {meta.opset}, exported {meta.exported_at}, onnxship {meta.onnxship_version}; "
        f"simplified: {simplified.simplified} ({simplified.nodes_before} -> {simplified.nodes_after} nodes)",
        "",
        "## Contract",
        f"- input `images`: uint8 [batch, {meta.input_size}, {meta.input_size}, 3], {meta.layout} RGB 0..255; "
        f"resize policy `{meta.resize_policy}` (serving.images.load_image)",
        f"- normalisation inside the graph: mean {list(meta.mean)}, std {list(meta.std)}",
        "- outputs `logits`, `probabilities` float32 [batch, classes]",
        "",
        "## Validation at release",
        f"- parity vs PyTorch: {parity.summary()}",
        f"- reference images: {accuracy.correct}/{accuracy.total} top-1 (a smoke check, not an accuracy estimate)",
        f"- CPU latency batch 1 with decode: p50 {b1.p50_ms:.1f} ms, p95 {b1.p95_ms:.1f} ms",
        "",
        "## Intended use and limits",
        "- General-purpose ImageNet-1k classification of photos; not calibrated for other domains.",
        "- Labels are ImageNet's; predictions on out-of-distribution images are still one of the 1000 classes.",
        "",
    ])


# ---------------------------------------------------------------- command line (`make release`)

def parse_args(argv: list[str] | None) -> ReleaseParams:
    parser = argparse.ArgumentParser(prog="python -m flows.release", description="Run the onnxship release flow.")
    parser.add_argument("--target", default=None, help="deploy target: local (default) or cerebrium")
    parser.add_argument("--arch", default=None)
    parser.add_argument("--weights", type=Path, default=None)
    parser.add_argument("--model-name", default=None)
    parser.add_argument("--port", type=int, default=None, help="local server port (default 8192)")
    parser.add_argument("--benchmark-duration", type=float, default=None, help="seconds per batch size and engine")
    parser.add_argument("--batch-sizes", default=None, help="comma-separated, e.g. 1,4,8")
    parser.add_argument("--tracking-uri", default=None, help="MLflow store (default: MLFLOW_TRACKING_URI or sqlite:///mlruns/mlflow.db)")
    parser.add_argument("--params", default=None, help="JSON object of ReleaseParams fields (applied first)")
    args = parser.parse_args(argv)
    data: dict = json.loads(args.params) if args.params else {}
    for key, value in (("target", args.target), ("arch", args.arch), ("weights", args.weights),
                       ("model_name", args.model_name), ("tracking_uri", args.tracking_uri)):
        if value is not None:
            data[key] = str(value) if isinstance(value, Path) else value
    if args.port is not None:
        data.setdefault("server", {})["port"] = args.port
    if args.benchmark_duration is not None:
        data.setdefault("benchmark", {})["duration_s"] = args.benchmark_duration
    if args.batch_sizes:
        data.setdefault("benchmark", {})["batch_sizes"] = [int(v) for v in args.batch_sizes.split(",")]
    return ReleaseParams.model_validate(data)


def main(argv: list[str] | None = None) -> int:
    global CONSOLE
    from pydantic import ValidationError

    CONSOLE = True
    try:
        params = parse_args(argv)
        print("onnxship release: validating parameters ...", flush=True)
        validate_release_params(params)  # before Prefect starts: a bad input fails in seconds
    except (ParameterError, ValidationError, json.JSONDecodeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print("starting the Prefect flow 'release' (no server configured: a temporary local Prefect API starts first, ~20 s)"
          if not os.environ.get("PREFECT_API_URL") else f"Prefect API: {os.environ['PREFECT_API_URL']}", flush=True)
    try:
        release(params)
    except ReleaseFailed as error:
        cause = error.__cause__
        if cause is not None and not isinstance(cause, (GateRejected, SmokeTestFailed, ParameterError)):
            traceback.print_exception(cause)
        print(f"\nrelease did not complete: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
