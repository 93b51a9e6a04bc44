"""python -m team up | down | status | env | pool KIND | import-local (see team/stack.py)."""

from __future__ import annotations

import argparse
import sys

from team.stack import Config, TeamError, down, env, status, up

COMMANDS = {"up": up, "down": down, "status": status, "env": env}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m team",
                                     description="The team stack: PostgreSQL, an MLflow tracking server and a Prefect server.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("up", help="start what is not running; print the variables to export")
    commands.add_parser("down", help="stop the servers by PID (the data stays)")
    commands.add_parser("status", help="what runs where (exit 1 unless all three run)")
    commands.add_parser("env", help="the export lines: eval \"$(python -m team env)\"")
    pool = commands.add_parser("pool", help="create a Docker/Kubernetes work pool from team/work-pools/ and deploy prefect.yaml onto it")
    pool.add_argument("kind", choices=["docker", "kubernetes"])
    pool.add_argument("--pool", default=None, help="work pool name (default onnxship-<kind>)")
    pool.add_argument("--workdir", default="/opt/onnxship", help="the project directory inside the image")
    pool.add_argument("--name", action="append", default=None, help="only this deployment of prefect.yaml (repeatable)")
    history = commands.add_parser("import-local", help="copy the local registry history into the team MLflow server")
    history.add_argument("--from", dest="source", default=None, help="local store (default sqlite:///mlruns/mlflow.db)")
    history.add_argument("--model-name", default="onnxship-classifier")
    args = parser.parse_args(argv)
    try:
        if args.command == "pool":
            from team.pools import deploy_to_pool

            return deploy_to_pool(args.kind, args.pool, args.workdir, args.name)
        if args.command == "import-local":
            from team.history import import_local

            return import_local(args.source, args.model_name)
        return COMMANDS[args.command](Config.from_env())
    except TeamError as error:
        print(f"team {args.command}: {error}", file=sys.stderr)
        return error.code


if __name__ == "__main__":
    sys.exit(main())
