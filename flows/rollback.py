"""Roll back: `@previous` becomes `@champion` again (and the old champion becomes `@previous`, so
running it twice undoes it), and the restored version is deployed where the champion served.

    make rollback                       # python -m flows.rollback
    python -m flows.rollback --no-restart

The Prefect deployment `rollback/rollback` runs the same flow; its trigger (prefect.yaml) starts it
automatically when the scheduled smoke test fails twice. An automatic rollback first checks that it is
still wanted: the last N finished smoke runs since the champion was promoted all failed (an automation
counts failures in a time window and cannot see a success between them), and no automatic rollback has
happened since the last release. It never fails the flow run for a "no": it records why.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime
from pathlib import Path

from prefect import flow

from flows import registry
from flows.deploy import ModelVersion, deploy
from flows.deploy.local import read_state, state_is_alive
from flows.lock import release_lock
from flows.params import DEFAULT_MODEL_NAME, DEFAULT_STATE_DIR, CerebriumSettings, ReleaseParams
from flows.reference import load_references
from flows.stages.smoke import SmokeTestFailed, run_smoke_test

SMOKE_DEPLOYMENT = "smoke-test/every-15-minutes"


def rollback_release(
    model_name: str = DEFAULT_MODEL_NAME,
    tracking_uri: str | None = None,
    state_dir: Path = DEFAULT_STATE_DIR,
    restart_local: bool = True,
    work_dir: Path = Path("models") / "release",
    automatic: bool = False,
    failures: int = 2,
) -> dict:
    """Swap @champion and @previous and deploy the restored version where the champion served."""
    client = registry.connect(tracking_uri)
    outcome = {"model_name": model_name, "rolled_back": False, "automatic": automatic, "restarted": None}
    if automatic:
        wanted, why = automatic_rollback_wanted(client, model_name, failures)
        outcome["reason"] = why
        if not wanted:
            return outcome
    reason = f"automatic: {outcome['reason']}" if automatic else "manual (make rollback)"
    with release_lock(state_dir, model_name):  # never while a release moves the same aliases
        from_version, to_version = registry.rollback(client, model_name, reason=reason, automatic=automatic)
        outcome.update(rolled_back=True, from_version=from_version, to_version=to_version)
        target = redeploy_target(client, model_name, from_version, state_dir, restart_local, automatic)
        if target is not None:
            outcome["restarted"] = redeploy(client, model_name, to_version, target, tracking_uri, state_dir, work_dir)
    return outcome


def automatic_rollback_wanted(client, model_name: str, failures: int) -> tuple[bool, str]:
    allowed, why = registry.auto_rollback_allowed(client, model_name)
    if not allowed:
        return False, why
    champion = registry.alias_version(client, model_name, registry.CHAMPION)
    if champion is None:
        return False, f"model {model_name!r} has no @champion"
    promoted_at = client.get_model_version(model_name, champion).tags.get("promoted_at")
    since = datetime.fromisoformat(promoted_at) if promoted_at else None
    return smoke_failed_in_a_row(SMOKE_DEPLOYMENT, failures, since)


def smoke_failed_in_a_row(deployment: str, count: int, since: datetime | None) -> tuple[bool, str]:
    """Whether the last `count` finished runs of the smoke deployment (started after `since`) all failed."""
    from prefect import get_client
    from prefect.client.schemas.filters import (DeploymentFilter, DeploymentFilterId, FlowRunFilter,
                                                FlowRunFilterStartTime, FlowRunFilterState, FlowRunFilterStateType)
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort

    finished = [StateType.COMPLETED, StateType.FAILED, StateType.CRASHED]
    with get_client(sync_client=True) as client:
        smoke = client.read_deployment_by_name(deployment)
        runs_filter = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=finished)))
        if since is not None:
            runs_filter.start_time = FlowRunFilterStartTime(after_=since)
        runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[smoke.id])),
                                     flow_run_filter=runs_filter, sort=FlowRunSort.END_TIME_DESC, limit=count)
    states = ", ".join(f"{run.name} {run.state.type.value}" for run in runs) or "none"
    if len(runs) < count:
        return False, f"only {len(runs)} finished smoke run(s) of the champion ({states}), {count} needed"
    if any(run.state.type == StateType.COMPLETED for run in runs):
        return False, f"the last {count} smoke runs did not all fail ({states})"
    return True, f"the last {count} smoke runs of the champion failed ({states})"


def redeploy_target(client, model_name: str, from_version: str, state_dir: Path, restart_local: bool,
                    automatic: bool) -> str | None:
    """Where the champion that is being replaced served: the local server (running, or recorded and down
    when the rollback is automatic: restoring service is its purpose), or Cerebrium."""
    state = read_state(state_dir)
    if restart_local and state and state.get("model_name") == model_name and (state_is_alive(state) or automatic):
        return "local"
    if from_version != "none" and client.get_model_version(model_name, from_version).tags.get("deploy.target") == "cerebrium":
        return "cerebrium"
    return None


def redeploy(client, model_name: str, version: str, target: str, tracking_uri: str | None, state_dir: Path,
             work_dir: Path) -> str:
    """Deploy `version` to `target` the way its release did, and smoke-test it."""
    tags = client.get_model_version(model_name, version).tags
    path = registry.download_version(client, model_name, version, Path(work_dir) / f"rollback-v{version}")
    params = ReleaseParams(model_name=model_name, tracking_uri=tracking_uri, state_dir=state_dir, target=target)
    state = read_state(state_dir)
    if target == "local" and state:
        params = params.model_copy(update={"server": params.server.model_copy(update={"host": state["host"],
                                                                                        "port": state["port"]})})
    if target == "cerebrium" and tags.get("deploy.settings"):
        params = params.model_copy(update={"cerebrium": CerebriumSettings.model_validate_json(tags["deploy.settings"])})
    run_id = client.get_model_version(model_name, version).run_id
    endpoint = deploy(target, path, params, ModelVersion(model_name, version, run_id))
    smoke = run_smoke_test(endpoint.url, endpoint.api_key, load_references(), params.smoke.latency_budget_s,
                           gateway_token=endpoint.gateway_token)
    if not smoke.passed:
        raise SmokeTestFailed(f"rolled back to v{version} but its smoke test failed: " + "; ".join(smoke.failures))
    return endpoint.url


def markdown(outcome: dict) -> str:
    name = outcome["model_name"]
    if not outcome["rolled_back"]:
        return f"# {name}: no rollback\n\n{outcome.get('reason', '')}\n"
    lines = [f"# ↩️ {name}: @champion v{outcome['from_version']} -> v{outcome['to_version']}", "",
             f"- started: {'automatically' if outcome['automatic'] else 'by a person'}"]
    if outcome.get("reason"):
        lines.append(f"- why: {outcome['reason']}")
    lines.append(f"- serving: {outcome['restarted'] or 'not redeployed (no recorded endpoint)'}")
    lines.append(f"- v{outcome['from_version']} is @previous: `make rollback` undoes this")
    return "\n".join(lines) + "\n"


@flow(name="rollback", log_prints=True)
def rollback(model_name: str = DEFAULT_MODEL_NAME, tracking_uri: str | None = None,
             state_dir: Path = DEFAULT_STATE_DIR, restart_local: bool = True, automatic: bool = False,
             failures: int = 2, trigger_flow_run: str | None = None) -> dict:
    """Prefect wrapper of `rollback_release`; `automatic` is set by the smoke-test trigger in prefect.yaml."""
    from prefect.artifacts import create_markdown_artifact

    outcome = rollback_release(model_name, tracking_uri, Path(state_dir), restart_local, automatic=automatic,
                               failures=failures)
    if trigger_flow_run:
        outcome["trigger"] = trigger_flow_run
    print(json.dumps(outcome))
    create_markdown_artifact(markdown(outcome), key=f"rollback-{model_name.lower()}",
                             description=f"rollback of {model_name}")
    return outcome


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.rollback", description=__doc__.splitlines()[0])
    parser.add_argument("--model-name", default=DEFAULT_MODEL_NAME)
    parser.add_argument("--tracking-uri", default=None)
    parser.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR)
    parser.add_argument("--no-restart", action="store_true", help="only move the aliases")
    args = parser.parse_args(argv)
    try:
        outcome = rollback_release(args.model_name, args.tracking_uri, args.state_dir, not args.no_restart)
    except Exception as error:
        print(f"rollback failed: {error}", file=sys.stderr)
        return 1
    print(f"rolled back {outcome['model_name']}: @champion v{outcome['from_version']} -> v{outcome['to_version']} "
          f"(v{outcome['from_version']} is now @previous)")
    if outcome["restarted"]:
        print(f"restarted v{outcome['to_version']} at {outcome['restarted']} (smoke test passed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
