"""Roll back: `@previous` becomes `@champion` again (and the old champion becomes `@previous`, so
running it twice undoes it). If the local server is running, it is restarted on the new champion
and smoke-tested.

    make rollback                       # python -m flows.rollback
    python -m flows.rollback --no-restart
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from prefect import flow

from flows import registry
from flows.deploy import ModelVersion, deploy
from flows.deploy.local import read_state, state_is_alive
from flows.params import DEFAULT_MODEL_NAME, DEFAULT_STATE_DIR, ReleaseParams
from flows.reference import load_references
from flows.stages.smoke import SmokeTestFailed, run_smoke_test


def rollback_release(
    model_name: str = DEFAULT_MODEL_NAME,
    tracking_uri: str | None = None,
    state_dir: Path = DEFAULT_STATE_DIR,
    restart_local: bool = True,
    work_dir: Path = Path("models") / "release",
) -> dict:
    """Swap @champion and @previous; restart the recorded local server on the new champion."""
    client = registry.connect(tracking_uri)
    from_version, to_version = registry.rollback(client, model_name)
    registry.tag_version(client, model_name, to_version, {"rollback.restored_from": from_version})
    outcome = {"model_name": model_name, "from_version": from_version, "to_version": to_version, "restarted": None}
    state = read_state(state_dir)
    if restart_local and state and state_is_alive(state) and state.get("model_name") == model_name:
        path = registry.download_version(client, model_name, to_version, Path(work_dir) / f"rollback-v{to_version}")
        server = {"host": state["host"], "port": state["port"]}
        params = ReleaseParams(model_name=model_name, tracking_uri=tracking_uri, state_dir=state_dir, server=server)
        run_id = client.get_model_version(model_name, to_version).run_id
        endpoint = deploy("local", path, params, ModelVersion(model_name, to_version, run_id))
        smoke = run_smoke_test(endpoint.url, endpoint.api_key, load_references(), params.smoke.latency_budget_s)
        outcome["restarted"] = endpoint.url
        if not smoke.passed:
            raise SmokeTestFailed(f"rolled back to v{to_version} but its smoke test failed: " + "; ".join(smoke.failures))
    return outcome


@flow(name="rollback")
def rollback(model_name: str = DEFAULT_MODEL_NAME, tracking_uri: str | None = None,
             state_dir: Path = DEFAULT_STATE_DIR, restart_local: bool = True) -> dict:
    """Prefect wrapper of `rollback_release` (a deployment can offer rollback as a button)."""
    return rollback_release(model_name, tracking_uri, Path(state_dir), restart_local)


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
        print(f"local server restarted on v{outcome['to_version']} at {outcome['restarted']} (smoke test passed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
