"""The release's command line (`make release ARGS=...`, `python -m flows.release ...`): flags -> ReleaseParams."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from flows.params import ReleaseParams


class ArgumentError(ValueError):
    """A command-line value cannot be read; the message names the flag."""


def release_params_from_argv(argv: list[str] | None) -> ReleaseParams:
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
    try:
        data: dict = json.loads(args.params) if args.params else {}
    except json.JSONDecodeError as error:
        raise ArgumentError(f"--params is not valid JSON: {error}") from None
    for key, value in (("target", args.target), ("arch", args.arch), ("weights", args.weights),
                       ("model_name", args.model_name), ("tracking_uri", args.tracking_uri)):
        if value is not None:
            data[key] = str(value) if isinstance(value, Path) else value
    if args.port is not None:
        data.setdefault("server", {})["port"] = args.port
    if args.benchmark_duration is not None:
        data.setdefault("benchmark", {})["duration_s"] = args.benchmark_duration
    if args.batch_sizes:
        try:
            data.setdefault("benchmark", {})["batch_sizes"] = [int(v) for v in args.batch_sizes.split(",")]
        except ValueError:
            raise ArgumentError(f"--batch-sizes {args.batch_sizes!r}: expected comma-separated integers") from None
    return ReleaseParams.model_validate(data)
