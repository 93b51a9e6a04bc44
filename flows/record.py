"""What a release records, and where.

`ReleaseRun` is the release's one MLflow run: opened right after validation, every stage logs into it
as it ends (metric keys grouped by stage with `/` and suffixed with their unit, the same keys on every
release, so `mlflow ui` lines versions up), named `<model> v<N>` once the version exists, and ended
FINISHED (promoted) or FAILED with the outcome. `record_outcome` then writes the outcome everywhere a
person looks: version tags, the run, the Prefect markdown artifact, `models/release/report.md`, the
console summary.
"""

from __future__ import annotations

import math
import os
import socket
import time
from pathlib import Path

from flows import registry
from serving.processes import pid_alive
from flows.params import ReleaseParams
from flows.report import ReleaseSummary, build_console, build_markdown, say
from flows.stages.benchmark import ENGINE_ORT_DECODE, BenchmarkResult
from flows.stages.smoke import SMOKE_METRIC_KEYS


class ReleaseRun:
    def __init__(self, params: ReleaseParams):
        self.model_name = params.model_name
        self.client = registry.connect(params.tracking_uri)
        self.experiment_id = registry.ensure_experiment(self.client, params.experiment or params.model_name)
        self.git_commit = registry.git_commit()
        self.close_abandoned_runs()
        self.run_id = registry.start_run(
            self.client, self.experiment_id, f"{params.model_name} release {time.strftime('%Y-%m-%d %H:%M:%S')}",
            {"onnxship.release": "true", "target": params.target, "git_commit": self.git_commit,
             "release.host": socket.gethostname(), "release.pid": str(os.getpid())},
        )

    def close_abandoned_runs(self) -> None:
        """A release killed mid-way (kill -9, a lost machine) left its run RUNNING: mark it KILLED. Only
        runs of this host whose process is gone; the caller holds the release lock, so none is running here."""
        host = socket.gethostname()
        for run in self.client.search_runs([self.experiment_id], "attributes.status = 'RUNNING'"):
            tags = run.data.tags
            if tags.get("onnxship.release") == "true" and tags.get("release.host") == host \
                    and not pid_alive(int(tags.get("release.pid", "0") or 0)):
                self.client.set_tag(run.info.run_id, registry.OUTCOME_TAG, "abandoned")
                registry.end_run(self.client, run.info.run_id, "KILLED")

    @property
    def link(self) -> str:
        return registry.run_link(self.client, self.experiment_id, self.run_id)

    def log_params(self, params: dict) -> None:
        registry.log_params(self.client, self.run_id, params)

    def log_metrics(self, metrics: dict[str, float]) -> None:
        registry.log_metrics(self.client, self.run_id, metrics)

    def log_artifacts(self, artifacts: dict[str, Path | str | dict]) -> None:
        registry.log_artifacts(self.client, self.run_id, artifacts)

    def name_version(self, version: str) -> None:
        """Once registered, the run is named after the version it produced."""
        self.client.set_tag(self.run_id, "mlflow.runName", f"{self.model_name} v{version}")
        self.client.set_tag(self.run_id, "model_version", version)

    def end(self, outcome: str) -> None:
        self.client.set_tag(self.run_id, registry.OUTCOME_TAG, outcome)
        registry.end_run(self.client, self.run_id, "FINISHED" if outcome == "promoted" else "FAILED")


def run_params(params: ReleaseParams, meta, simplified, git_commit: str) -> dict:
    """The same keys on every release, so MLflow's Compare view lines versions up."""
    import onnxruntime
    import torch

    return {
        "arch": meta.arch, "weights": str(params.weights or "bundled default"), "weights_sha256": meta.weights_sha256,
        "opset": meta.opset, "input_size": meta.input_size, "resize_policy": meta.resize_policy, "layout": meta.layout,
        "num_classes": meta.num_classes, "onnxship_version": meta.onnxship_version, "git_commit": git_commit,
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


def graph_metrics(exported, simplified) -> dict[str, float]:
    return {"graph/nodes_exported_count": float(exported.node_count),
            "graph/nodes_simplified_count": float(simplified.nodes_after),
            "graph/simplified": 1.0 if simplified.simplified else 0.0}


def stage_metrics(timings: dict[str, float]) -> dict[str, float]:
    return {f"stage/{name.replace(' ', '_')}_s": seconds for name, seconds in timings.items()}


def model_card(params: ReleaseParams, meta, parity, accuracy, bench: BenchmarkResult, simplified,
               precision: str = "fp32") -> str:
    b1 = bench.row(ENGINE_ORT_DECODE, 1)
    return "\n".join([
        f"# Model card: {params.model_name}",
        "",
        f"- Architecture: `{meta.arch}`, {meta.num_classes} classes (ImageNet label names), input {meta.input_size}x{meta.input_size}",
        f"- Weights: {params.weights or 'bundled pretrained default'} (sha256 `{meta.weights_sha256}`)",
        f"- ONNX opset {meta.opset}, exported {meta.exported_at}, onnxship {meta.onnxship_version}; "
        f"simplified: {simplified.simplified} ({simplified.nodes_before} -> {simplified.nodes_after} nodes)",
        f"- Precision: {precision} (the variant the gate chose; parity below is the fp32 export's)",
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


def record_outcome(params: ReleaseParams, summary: ReleaseSummary, run: ReleaseRun | None, registered) -> None:
    """Record the outcome everywhere a person looks, the console summary last."""
    markdown = build_markdown(summary)
    if run is not None:
        try:
            record_in_mlflow(params, summary, run, registered, markdown)
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


def record_in_mlflow(params: ReleaseParams, summary: ReleaseSummary, run: ReleaseRun, registered, markdown: str) -> None:
    run.log_metrics(stage_metrics(summary.timings))
    run.log_metrics(summary.smoke["metrics"] if summary.smoke else dict.fromkeys(SMOKE_METRIC_KEYS, math.nan))
    run.log_artifacts({"release_report.md": markdown})
    if summary.failed_stage:
        run.client.set_tag(run.run_id, "release.failed_stage", summary.failed_stage)
    if registered is not None:
        tags = {registry.OUTCOME_TAG: summary.outcome}
        if summary.endpoint_url:
            tags["deploy.url"] = summary.endpoint_url
            tags["deploy.target"] = params.target
            if params.target == "cerebrium":  # what an automatic rollback needs to redeploy this version
                tags["deploy.settings"] = params.cerebrium.model_dump_json()
        if summary.smoke is not None or summary.outcome == "failed" and summary.failed_stage == "smoke test":
            tags["smoke.passed"] = str(bool(summary.smoke and summary.smoke.get("passed"))).lower()
        if summary.outcome == "failed" and summary.verdict == "pass" and summary.failed_stage:
            tags["release.failed_stage"] = summary.failed_stage
        registry.tag_version(run.client, params.model_name, registered.version, tags)
        registry.sync_roles(run.client, params.model_name)
    run.end(summary.outcome)


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


VARIANT_STATS = ("p50_ms", "p95_ms", "p99_ms", "img_per_s")


def log_variant_runs(run: ReleaseRun, params: ReleaseParams, variants, choice, benches: dict[str, BenchmarkResult]) -> list[dict]:
    """One child run per variant under the release's run, every one with the same metric keys (NaN where a
    refused variant has no figure), so `mlflow ui` compares them side by side; returns the report's rows."""
    nan = math.nan
    fp32 = variants.fp32.agreement
    rows = []
    for variant in variants.variants:
        a, bench = variant.agreement, benches.get(variant.precision)
        speedup = 1.0 if variant is variants.fp32 else variant.speedup
        metrics = {
            "variant/built": 1.0 if variant.usable else 0.0,
            "variant/chosen": 1.0 if variant.precision == choice.chosen else 0.0,
            "variant/top1_agreement": a.top1_agreement if a else nan,
            "variant/top5_agreement": a.top5_agreement if a else nan,
            "variant/top1_accuracy": a.accuracy if a and a.labelled else nan,
            "variant/top5_accuracy": a.top5_accuracy if a and a.labelled else nan,
            "variant/accuracy_drop": fp32.accuracy - a.accuracy if a and a.labelled and fp32.labelled else nan,
            "variant/eval_images_count": float(len(variants.split.evaluation)),
            "variant/speedup": speedup if speedup is not None else nan,
            "variant/size_mb": variant.size_bytes / 1e6 if variant.size_bytes else nan,
        }
        for size in params.benchmark.batch_sizes:
            for key in ("ort", "ort_decode"):
                row = next((r for r in bench.rows if r.key == f"{key}_b{size}"), None) if bench else None
                values = (row.p50_ms, row.p95_ms, row.p99_ms, row.throughput) if row else (nan,) * 4
                metrics.update({f"benchmark/{key}_b{size}_{stat}": value for stat, value in zip(VARIANT_STATS, values)})
        verdict = choice.verdicts.get(variant.precision, "")
        reasons = "\n".join(choice.decisions.get(variant.precision, []))
        child = registry.start_run(run.client, run.experiment_id, f"{params.model_name} {variant.precision}", {
            "mlflow.parentRunId": run.run_id, "onnxship.variant": "true", "precision": variant.precision,
            "variant.verdict": verdict, "variant.reasons": reasons or "the baseline", "target_device": variants.device})
        run.client.log_param(child, "precision", variant.precision)
        registry.log_metrics(run.client, child, metrics)
        registry.end_run(run.client, child, "FINISHED")
        rows.append({"precision": variant.precision, "verdict": verdict, "run_id": child,
                     "why": choice.why(variant.precision),
                     **{key.split("/", 1)[1]: value for key, value in metrics.items()
                        if key.startswith("variant/") or key == "benchmark/ort_b1_img_per_s"}})
    run.client.set_tag(run.run_id, "precision", choice.chosen)
    run.log_artifacts({"variants.json": {**variants.to_dict(), "choice": choice.to_dict()}})
    return rows
