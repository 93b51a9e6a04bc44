"""What a release records: the MLflow run's params, metrics and model card, and, at the end, its
outcome everywhere a person looks (version tags, the MLflow run, the Prefect markdown artifact,
`models/release/report.md`, the console summary)."""

from __future__ import annotations

import math
from pathlib import Path

from flows import registry
from flows.params import ReleaseParams
from flows.report import ReleaseSummary, build_console, build_markdown, say
from flows.stages.benchmark import ENGINE_ORT_DECODE, BenchmarkResult
from flows.stages.smoke import SMOKE_METRIC_KEYS


def run_params(params: ReleaseParams, meta, simplified) -> dict:
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


def release_metrics(exported, simplified, parity, accuracy, bench: BenchmarkResult) -> dict:
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


def record_outcome(params: ReleaseParams, summary: ReleaseSummary, registered) -> None:
    """Record the outcome everywhere a person looks, the console summary last."""
    markdown = build_markdown(summary)
    if registered is not None:
        try:
            record_in_mlflow(params, summary, registered, markdown)
        except Exception as error:
            say(f"      warning: could not record the outcome in MLflow: {error}")
    (Path(params.output_dir) / "release" / "report.md").write_text(markdown)
    try:
        from prefect.artifacts import create_markdown_artifact

        create_markdown_artifact(markdown, key=artifact_key(params.model_name),
                                 description=f"release of {params.model_name}: {summary.outcome}")
    except Exception as error:
        say(f"      warning: could not create the Prefect artifact: {error}")
    say(build_console(summary, prefect_ui_hint()))


def record_in_mlflow(params: ReleaseParams, summary: ReleaseSummary, registered, markdown: str) -> None:
    client = registry.connect(params.tracking_uri)
    tags = {"release.outcome": summary.outcome}
    if summary.endpoint_url:
        tags["deploy.url"] = summary.endpoint_url
        tags["deploy.target"] = params.target
    if summary.smoke is not None or summary.outcome == "failed" and summary.failed_stage == "smoke test":
        tags["smoke.passed"] = str(bool(summary.smoke and summary.smoke.get("passed"))).lower()
    if summary.outcome == "failed" and summary.verdict == "pass" and summary.failed_stage:
        tags["release.failed_stage"] = summary.failed_stage
    registry.tag_version(client, params.model_name, registered.version, tags)
    registry.log_metrics(client, registered.run_id, {f"stage_{k.replace(' ', '_')}_s": v for k, v in summary.timings.items()})
    smoke_metrics = summary.smoke["metrics"] if summary.smoke else dict.fromkeys(SMOKE_METRIC_KEYS, math.nan)
    registry.log_metrics(client, registered.run_id, smoke_metrics)
    client.set_tag(registered.run_id, "release.outcome", summary.outcome)
    client.log_text(registered.run_id, markdown, "release_report.md")
    registry.end_run(client, registered.run_id, "FINISHED" if summary.outcome == "champion" else "FAILED")


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
