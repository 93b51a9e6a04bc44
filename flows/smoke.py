"""The scheduled smoke test: the Prefect flow `smoke-test` (prefect.yaml, every 15 minutes).

It finds the endpoint (parameters, else the local server record), runs the smoke stage
(`flows.stages.smoke.run_smoke_test`), logs a run to the MLflow experiment `<model>-smoke-tests`,
publishes a markdown artifact, and fails the flow run (red in the UI) when anything is off.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows import registry
from flows.deploy.local import read_state
from flows.params import DEFAULT_MODEL_NAME, DEFAULT_STATE_DIR
from flows.reference import load_references
from flows.secrets import APP_KEY, CEREBRIUM_GATEWAY, resolve_secret
from flows.stages.smoke import DEFAULT_MIN_ACCURACY, SmokeResult, SmokeTestFailed, run_smoke_test

SMOKE_EXPERIMENT_SUFFIX = "-smoke-tests"


class NothingToTest(Exception):
    """The local server was stopped on purpose (`make stop-server`): a smoke run has nothing to check."""


def resolve_endpoint(url: str | None, state_dir: Path) -> tuple[str, str | None, dict]:
    """The URL (parameter, else the local server record) and its key: the app key ($API_KEY or its
    Prefect Secret), else the key the local server record holds. Keys are never flow parameters:
    Prefect stores parameters in its database and shows them in the UI."""
    state = read_state(state_dir) or {}
    if url is None and state.get("stopped_at") and not state.get("pid"):
        raise NothingToTest(f"the local server was stopped on purpose at {state['stopped_at']} "
                            f"({state.get('url')}); `make release` or `make rollback` starts one again")
    url = url or state.get("url")
    if not url:
        raise SmokeTestFailed(f"no endpoint to test: pass url=..., or deploy locally first (no {state_dir}/local-server.json)")
    api_key = resolve_secret(APP_KEY) or (state.get("api_key") if state.get("url") == url else None)
    return url, api_key, state


def log_smoke_to_mlflow(result: SmokeResult, model_name: str, tracking_uri: str | None, tags: dict[str, str]) -> str:
    client = registry.connect(tracking_uri)
    experiment_id = registry.ensure_experiment(client, model_name + SMOKE_EXPERIMENT_SUFFIX)
    run_id = registry.start_run(client, experiment_id, f"smoke {'ok' if result.passed else 'FAILED'}",
                                {**tags, "smoke.url": result.url, "smoke.passed": str(result.passed).lower()})
    registry.log_metrics(client, run_id, result.metrics())
    client.log_text(run_id, result.markdown(), "smoke_report.md")
    client.log_dict(run_id, result.to_dict(), "smoke_result.json")
    registry.end_run(client, run_id, "FINISHED" if result.passed else "FAILED")
    return run_id


@flow(name="smoke-test", log_prints=True, timeout_seconds=300)
def smoke_test(
    url: str | None = None,
    model_name: str = DEFAULT_MODEL_NAME,
    images_dir: Path | None = None,
    manifest: Path | None = None,
    latency_budget_s: float = 2.0,
    min_accuracy: float = DEFAULT_MIN_ACCURACY,
    tracking_uri: str | None = None,
    state_dir: Path = DEFAULT_STATE_DIR,
) -> dict:
    """Scheduled post-deploy check of the serving endpoint (fails the flow run on any failure).
    Keys come from the environment or Prefect Secret blocks (API_KEY, CEREBRIUM_API_KEY for a gateway)."""
    logger = get_run_logger()
    try:
        url, api_key, state = resolve_endpoint(url, Path(state_dir))
    except NothingToTest as reason:
        logger.warning("smoke test skipped: %s", reason)
        return {"skipped": str(reason)}
    references = load_references(images_dir, manifest)
    result = run_smoke_test(url, api_key, references, latency_budget_s, gateway_token=resolve_secret(CEREBRIUM_GATEWAY),
                            min_accuracy=min_accuracy)
    tags = {"model_name": model_name}
    if state.get("url") == url and state.get("version"):
        tags["model_version"] = str(state["version"])
    try:
        run_id = log_smoke_to_mlflow(result, model_name, tracking_uri, tags)
        logger.info("smoke test logged to MLflow run %s", run_id)
    except Exception as error:  # the endpoint's verdict must not be hidden by a logging problem
        logger.warning("could not log the smoke test to MLflow: %s", error)
    create_markdown_artifact(result.markdown(), key="smoke-test", description=f"smoke test of {url}")
    if not result.passed:
        raise SmokeTestFailed(f"smoke test of {url} FAILED:\n  - " + "\n  - ".join(result.failures))
    logger.info("smoke test of %s passed: %d images, max latency %.0f ms", url, len(result.checks),
                max(result.latencies, default=0) * 1000)
    return result.to_dict()
