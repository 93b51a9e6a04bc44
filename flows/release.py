"""The release flow: one Prefect task per stage, in the order a model travels.

    validate -> export -> simplify -> parity -> variants -> benchmark -> register -> gate -> deploy -> smoke test
    -> promote

`make release` runs it with the defaults (Prefect without a server, MLflow in mlruns/, the local
target on 127.0.0.1:8192); `prefect deployment run 'release/local'` runs it on a worker.
Nothing moves `@champion` unless the gate, the deploy and the smoke test all passed.
"""

from __future__ import annotations

import os
import sys
import traceback
from dataclasses import replace
from pathlib import Path

if __name__ == "__main__":
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "CRITICAL")  # the console shows our stage lines instead
    # prefect.toml turns the temporary API off (a bare `prefect deployment run` must not queue runs on a
    # throwaway server); `make release` without a server is exactly what the temporary API is for
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_ENABLED", "true")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # not "Creating initial MLflow database tables..."

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows import registry, report
from flows.deploy import Endpoint, ModelVersion, deploy
from flows.lock import ReleaseBusy, ensure_free, release_lock
from flows.params import ParameterError, ReleaseParams
from flows.record import ReleaseRun, graph_metrics, log_variant_runs, model_card, record_outcome, run_params
from flows.reference import load_references
from flows.report import ReleaseSummary, Stages, progress_printer, say
from flows.stages.benchmark import (ENGINE_ORT_DECODE, BenchmarkResult, benchmark_artifact, paired_speedup,
                                    plot_benchmark)
from flows.stages.evaluate import VariantSet, prepare_variants
from flows.stages.gate import CandidateFigures, GateVerdict, choose_variant, compare_with_champion, evaluate_gate
from flows.stages.accuracy import measure_accuracy
from flows.stages.smoke import SmokeResult, SmokeTestFailed, run_smoke_test
from flows.validate import validate_once
from serving.artifact import file_sha256
from serving.runtime import Classifier


class ReleaseFailed(RuntimeError):
    """A stage failed or the gate rejected the candidate; the message is the release summary."""


class GateRejected(ReleaseFailed):
    pass


# ---------------------------------------------------------------- stages (one Prefect task each)


@task(name="export", timeout_seconds=900, cache_policy=NO_CACHE)
def export_stage(params: ReleaseParams, output: Path):
    from flows.model.zoo import load_model
    from flows.stages.export import DEFAULT_OPSET, export_onnx

    loaded = load_model(params.arch, params.weights, random_init=params.random_init)
    exported = export_onnx(loaded, output, resize_policy=params.resize_policy, opset=params.opset or DEFAULT_OPSET)
    return loaded, exported


@task(name="simplify", timeout_seconds=600, cache_policy=NO_CACHE)
def simplify_stage(raw: Path, output: Path):
    from flows.stages.simplify import simplify_onnx

    return simplify_onnx(raw, output)


@task(name="parity", timeout_seconds=600, cache_policy=NO_CACHE)
def parity_stage(loaded, candidate: Classifier, references, params: ReleaseParams):
    from flows.stages.parity import ParityTolerances, check_parity

    tolerances = ParityTolerances(params.parity.min_top1_agreement, params.parity.max_prob_diff)
    parity = check_parity(loaded, candidate, references, batch_sizes=params.parity.batch_sizes, tolerances=tolerances)
    return parity, measure_accuracy(candidate, references)


@task(name="variants", timeout_seconds=1800, cache_policy=NO_CACHE)
def variants_stage(params: ReleaseParams, loaded, candidate: Classifier, path: Path, references, workdir: Path):
    """fp32 and the reduced-precision variants for the target's device, each judged against PyTorch
    on the evaluation images; a variant that fails is refused with its reason, fp32 continues."""
    return prepare_variants(params, loaded, candidate, path, references, workdir, say)


@task(name="benchmark", timeout_seconds=1800, cache_policy=NO_CACHE)
def benchmark_stage(candidate: Classifier, references, params: ReleaseParams, loaded, plot_path: Path,
                    variants: VariantSet) -> tuple[BenchmarkResult, dict[str, BenchmarkResult]]:
    """fp32 (and PyTorch), then every usable reduced-precision variant, and each variant's speed-up
    against fp32 measured in alternating rounds; one plot with all of them."""
    settings = params.benchmark
    images = [r.path for r in references]
    result = benchmark_artifact(
        candidate, images, settings.batch_sizes, settings.duration_s, settings.warmup_calls,
        torch_module=loaded.module if settings.include_torch else None, progress=progress_printer("benchmark"),
    )
    others = {}
    for variant in (v for v in variants.variants[1:] if v.usable):
        try:
            others[variant.precision] = benchmark_artifact(
                variant.classifier, images, settings.batch_sizes, settings.duration_s, settings.warmup_calls,
                progress=progress_printer(f"benchmark {variant.precision}"))
            variant.speedup = paired_speedup(candidate, variant.classifier, images,
                                             duration_s=max(0.5, min(10.0, 3 * settings.duration_s)))
        except Exception as error:  # a variant that cannot be timed is refused; fp32 goes on
            others.pop(variant.precision, None)
            variant.refused = f"{variant.precision} failed in the benchmark: {type(error).__name__}: {error}"[:400]
    plot_benchmark(result, plot_path, title=f"{params.model_name} ({params.arch}), CPU, in-process", variants=others)
    return result, others


@task(name="register", timeout_seconds=600, cache_policy=NO_CACHE)
def register_stage(params: ReleaseParams, run: ReleaseRun, onnx_path: Path, meta, workdir: Path, precision: str):
    """The ONNX model logged to the release's run and registered as a new version (@candidate). What gate,
    deploy and smoke test use afterwards is the registered file itself, fetched back from the registry."""
    tags = {"arch": params.arch, "weights_sha256": meta.weights_sha256, "git_commit": run.git_commit,
            "gate.verdict": "pending", "precision": precision}
    registered = registry.register_release(run.client, params.model_name, run.experiment_id, run.run_id, onnx_path, tags)
    run.name_version(registered.version)
    local = registry.download_version(run.client, params.model_name, registered.version,
                                      workdir / f"registered-v{registered.version}")
    if file_sha256(local) != registered.sha256:
        raise registry.RegistryError(f"models:/{params.model_name}/{registered.version} does not match the validated file")
    return registered, local


@task(name="gate", timeout_seconds=900, cache_policy=NO_CACHE)
def gate_stage(params: ReleaseParams, registered, candidate: Classifier, figures: CandidateFigures, references,
               workdir: Path) -> GateVerdict:
    client = registry.connect(params.tracking_uri)
    champion = registry.alias_version(client, params.model_name, registry.CHAMPION)
    comparison = None
    if champion is not None and champion != registered.version:
        champion_path = registry.download_version(client, params.model_name, champion, workdir / f"champion-v{champion}")
        duration = max(0.3, min(3.0, params.benchmark.duration_s))
        comparison = compare_with_champion(candidate, figures.accuracy, champion_path, champion, references,
                                           duration_s=duration)
    verdict = evaluate_gate(figures, params.gate, params.parity, comparison)
    registry.tag_version(client, params.model_name, registered.version, verdict.tags())
    return verdict


@task(name="deploy", retries=1, retry_delay_seconds=5, timeout_seconds=3600, cache_policy=NO_CACHE)
def deploy_stage(params: ReleaseParams, artifact: Path, model: ModelVersion) -> Endpoint:
    return deploy(params.target, artifact, params, model)


@task(name="smoke test", retries=2, retry_delay_seconds=3, timeout_seconds=600, cache_policy=NO_CACHE)
def smoke_stage(endpoint: Endpoint, expected, params: ReleaseParams) -> SmokeResult:
    """The endpoint must answer, within budget, exactly the classes the validated artifact gave in parity."""
    result = run_smoke_test(endpoint.url, endpoint.api_key, expected, params.smoke.latency_budget_s,
                            gateway_token=endpoint.gateway_token, timeout_s=params.smoke.timeout_s, min_accuracy=1.0)
    if not result.passed:
        raise SmokeTestFailed(f"smoke test of {endpoint.url} failed: " + "; ".join(result.failures))
    return result


@task(name="promote", timeout_seconds=120, cache_policy=NO_CACHE)
def promote_stage(params: ReleaseParams, version: str) -> str | None:
    client = registry.connect(params.tracking_uri)
    return registry.promote(client, params.model_name, version)


# ---------------------------------------------------------------- the flow


@flow(name="release", timeout_seconds=4 * 3600)
def release(params: ReleaseParams = ReleaseParams()) -> dict:
    """Export, validate, register, gate, deploy and smoke-test a model; promote it if all pass.
    One release at a time per model: a second one is refused with the name of the first."""
    with release_lock(params.state_dir, params.model_name, flow_run=current_flow_run()):
        return run_stages(params)


def run_stages(params: ReleaseParams) -> dict:
    stages = Stages()
    summary = ReleaseSummary(model_name=params.model_name, target=params.target,
                             tracking_uri=registry.resolve_tracking_uri(params.tracking_uri))
    with stages.run("validate"):
        for note in validate_once(params):
            say(f"      note: {note}")
        references = load_references(params.images_dir, params.manifest)
    workdir = Path(params.output_dir) / "release"
    workdir.mkdir(parents=True, exist_ok=True)
    run = registered = None
    try:
        run = ReleaseRun(params)
        summary.run_id, summary.experiment_id, summary.run_link = run.run_id, run.experiment_id, run.link
        with stages.run("export"):
            loaded, exported = export_stage(params, workdir / "model.raw.onnx")
        with stages.run("simplify"):
            simplified = simplify_stage(exported.path, workdir / "model.onnx")
            summary.nodes, summary.simplify_error = (simplified.nodes_before, simplified.nodes_after), simplified.error
            run.log_params(run_params(params, exported.metadata, simplified, run.git_commit))
            run.log_metrics(graph_metrics(exported, simplified))
        # one ONNX Runtime session on the candidate serves parity, accuracy, benchmark and the gate
        candidate = Classifier(simplified.path, device="cpu", intra_op_threads=params.benchmark.threads)
        with stages.run("parity"):
            parity, accuracy = parity_stage(loaded, candidate, references, params)
            summary.parity, summary.accuracy = parity.to_dict(), accuracy.to_dict()
            run.log_metrics({**parity.metrics(), **accuracy.metrics()})
            run.log_artifacts({"parity_report.json": parity.to_dict(), "accuracy.json": accuracy.to_dict()})
            say(f"      {parity.summary()}; reference accuracy {accuracy.correct}/{accuracy.total}")
        with stages.run("variants"):
            variants = variants_stage(params, loaded, candidate, simplified.path, references, workdir)
        with stages.run("benchmark"):
            bench, variant_benches = benchmark_stage(candidate, references, params, loaded, workdir / "benchmark.png",
                                                     variants)
            summary.benchmark, summary.plot_path = bench.to_dict(), str(workdir / "benchmark.png")
            run.log_metrics(bench.metrics())
            run.log_artifacts({"benchmark.json": bench.to_dict(), "benchmark": workdir / "benchmark.png"})
            choice = choose_variant(variants.variants, params.variant_budget, variants.device)
            chosen = variants.get(choice.chosen)
            summary.variants = log_variant_runs(run, params, variants, choice, {"fp32": bench, **variant_benches})
            summary.variant_images = variants.split.how
            for line in choice.lines():
                say(f"      {line}")
            if chosen is not variants.fp32:  # the gate judges what ships: the chosen variant
                accuracy = measure_accuracy(chosen.classifier, references)
                bench = variant_benches[chosen.precision]
                candidate = chosen.classifier
        del loaded
        with stages.run("register"):
            run.log_artifacts({"model_card.md": model_card(params, exported.metadata, parity, accuracy, bench, simplified,
                                                         chosen.precision)})
            registered, registered_path = register_stage(params, run, chosen.path, exported.metadata, workdir,
                                                         chosen.precision)
            summary.version = registered.version
            say(f"      registered models:/{params.model_name}/{registered.version} (@candidate), run {registered.run_id}")
        with stages.run("gate"):
            figures = CandidateFigures(parity.top1_agreement, parity.max_abs_prob_diff, accuracy.top1, accuracy.correct,
                                       accuracy.total, bench.row(ENGINE_ORT_DECODE, 1).p95_ms)
            verdict = gate_stage(params, registered, candidate, figures, references, workdir)
            run.log_metrics(verdict.metrics())
            summary.verdict, summary.reasons = verdict.verdict, verdict.reasons
            summary.previous_champion = verdict.comparison.champion_version if verdict.comparison else None
            for reason in verdict.reasons:
                say(f"      {reason}")
            if not verdict.passed:
                summary.outcome = "rejected"
                raise GateRejected(f"gate rejected v{registered.version}: " + "; ".join(verdict.failures))
        with stages.run("deploy"):
            model = ModelVersion(params.model_name, registered.version, registered.run_id)
            endpoint = deploy_stage(params, registered_path, model)
            summary.record_endpoint(endpoint)
            say(f"      serving at {endpoint.url}")
        with stages.run("smoke test"):
            expected = [replace(ref, expected_class=cls, label=candidate.labels[cls])
                        for ref, cls in zip(references, answers(candidate, references))]
            try:
                smoke = smoke_stage(endpoint, expected, params)
            except SmokeTestFailed:
                restore_champion(params, workdir)
                raise
            summary.smoke = smoke.to_dict()
        with stages.run("promote"):
            summary.previous_champion = promote_stage(params, registered.version)
            summary.outcome = "promoted"
    except BaseException as error:
        if summary.outcome == "running":
            summary.outcome = "failed"
        summary.failed_stage = stages.current
        if not isinstance(error, GateRejected):
            summary.error = f"{type(error).__name__}: {error}"
        summary.timings = dict(stages.timings)
        record_outcome(params, summary, run, registered)
        raise ReleaseFailed(f"release {summary.title}" + (f": {summary.error}" if summary.error else "")) from error
    summary.timings = dict(stages.timings)
    record_outcome(params, summary, run, registered)
    return {"outcome": summary.outcome, "version": summary.version, "run_id": summary.run_id,
            "verdict": summary.verdict, "reasons": summary.reasons, "endpoint": summary.endpoint_url,
            "previous_champion": summary.previous_champion, "timings": summary.timings}


def answers(classifier: Classifier, references) -> list[int]:
    """The artifact's top-1 class per reference image, in order: what the deployment must answer."""
    return [int(classifier.predict(classifier.load_input(ref.path)).argmax()) for ref in references]


def current_flow_run() -> str | None:
    try:
        from prefect.runtime import flow_run

        return f"{flow_run.name} ({flow_run.id})"
    except Exception:
        return None


def restore_champion(params: ReleaseParams, workdir: Path) -> None:
    """After a failed smoke test, redeploy the current champion so that it, not the rejected
    candidate, serves (on the local port, or as a new Cerebrium build of the champion)."""
    client = registry.connect(params.tracking_uri)
    champion = registry.alias_version(client, params.model_name, registry.CHAMPION)
    if champion is None:
        return
    try:
        path = registry.download_version(client, params.model_name, champion, workdir / f"champion-v{champion}")
        endpoint = deploy(params.target, path, params, ModelVersion(params.model_name, champion))
        say(f"      smoke test failed: restored champion v{champion} at {endpoint.url}")
    except Exception as error:
        say(f"      smoke test failed and restoring champion v{champion} failed too: {error}")


# ---------------------------------------------------------------- command line (`make release`)


EXIT_PROMOTED, EXIT_NOT_PROMOTED, EXIT_BAD_PARAMETERS = 0, 1, 2


def main(argv: list[str] | None = None) -> int:
    """`python -m flows.release`: 0 promoted, 1 rejected or failed, 2 bad parameters."""
    from flows.cli import ArgumentError, parse_command

    report.CONSOLE = True
    try:
        params, debug = parse_command(sys.argv[1:] if argv is None else argv)
        print("onnxship release: validating parameters ...", flush=True)
        validate_once(params)  # before Prefect starts: a bad input fails in seconds
    except SystemExit as exit_:  # --help
        return int(exit_.code or 0)
    except (ParameterError, ArgumentError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_PARAMETERS
    try:
        ensure_free(params.state_dir, params.model_name)
    except ReleaseBusy as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_NOT_PROMOTED
    print("starting the Prefect flow 'release' (no server configured: a temporary local Prefect API starts first, ~20 s)"
          if not os.environ.get("PREFECT_API_URL") else f"Prefect API: {os.environ['PREFECT_API_URL']}", flush=True)
    try:
        release(params)
    except ReleaseBusy as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_NOT_PROMOTED
    except ReleaseFailed as error:
        if debug and error.__cause__ is not None:
            traceback.print_exception(error.__cause__)
        hint = "" if debug or isinstance(error.__cause__, GateRejected) else " (--debug shows the traceback)"
        print(f"\nrelease did not complete: {error}{hint}", file=sys.stderr)
        return EXIT_NOT_PROMOTED
    return EXIT_PROMOTED


if __name__ == "__main__":
    sys.exit(main())
