"""`make prefect-run ARGS="--gate.min-accuracy 1"`: queue a release on the Prefect server with the same
flags as `make release`, sent as the deployment's `params` parameter.

    python -m flows.submit release/local --arch resnet18 --random-init

Refuses (exit 2) when no Prefect server answers, instead of letting `prefect deployment run` queue the
run on a temporary server; warns when no worker polls the deployment's work pool.
"""

from __future__ import annotations

import os
import sys
import urllib.request

from flows.cli import ArgumentError, parse_command


def server_problem() -> str | None:
    api = os.environ.get("PREFECT_API_URL")
    if not api:
        return ("PREFECT_API_URL is not set: start a server with `make prefect-server` and "
                "`export PREFECT_API_URL=http://127.0.0.1:4200/api` (make's prefect targets set it for you)")
    try:
        urllib.request.urlopen(api.rstrip("/") + "/health", timeout=5).read()
    except OSError as error:
        return f"no Prefect server answers at {api} ({error}): start it with `make prefect-server`"
    return None


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0].startswith("-"):
        print("usage: python -m flows.submit FLOW/DEPLOYMENT [release flags, see python -m flows.release --help]\n"
              "  e.g. python -m flows.submit release/local --gate.min-accuracy 1", file=sys.stderr)
        return 0 if args[:1] in (["-h"], ["--help"]) else 2
    deployment, *flags = args
    try:
        params, _ = parse_command(flags)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    except ArgumentError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    problem = server_problem()
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    run = run_deployment(deployment, parameters={"params": params.model_dump(mode="json", exclude_defaults=True)},
                         timeout=0)
    with get_client(sync_client=True) as client:
        pool = client.read_work_pool(client.read_deployment(run.deployment_id).work_pool_name)
    ui = os.environ["PREFECT_API_URL"].rstrip("/").removesuffix("/api")
    print(f"queued {deployment} run {run.name}: {ui}/runs/flow-run/{run.id}")
    if str(pool.status.value if pool.status else "") != "READY":
        print(f"warning: no worker polls work pool {pool.name!r}: start one with `make prefect-worker`", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
