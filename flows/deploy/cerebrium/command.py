"""The `python -m flows.deploy.cerebrium` command: stage, preflight or deploy a bundle by hand."""

from __future__ import annotations

import argparse
import logging

from flows.deploy.base import DeployError
from flows.deploy.cerebrium.bundle import stage_bundle
from flows.deploy.cerebrium.contract import MODEL_PATH_IN_BUNDLE, CerebriumError
from flows.deploy.cerebrium.preflight import preflight
from flows.deploy.cerebrium.target import deploy_cerebrium
from flows.params import CerebriumSettings
from flows.secrets import CEREBRIUM_GATEWAY, CEREBRIUM_TOKEN, resolve_secret
from serving.model_uri import resolve_model


def main(argv: list[str] | None = None) -> int:
    """python -m flows.deploy.cerebrium stage|preflight|deploy [ARTIFACT | models:/<name>@<alias>]

    stage      build the bundle (build/cerebrium/<app>-<sha>/), nothing else
    preflight  build it and run every check (token, CLI, port, include list, size, sha256)
    deploy     build, check, `cerebrium deploy -y`, wait for /ready; e.g. a rollback:
               python -m flows.deploy.cerebrium deploy models:/onnxship-classifier@champion
    """
    parser = argparse.ArgumentParser(prog="python -m flows.deploy.cerebrium", description=main.__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(main.__doc__.split("\n")[2:]))
    parser.add_argument("command", choices=["stage", "preflight", "deploy"])
    parser.add_argument("artifact", nargs="?", default=MODEL_PATH_IN_BUNDLE,
                        help=f"an .onnx file or models:/<name>@<alias> (default {MODEL_PATH_IN_BUNDLE})")
    parser.add_argument("--out", default=None, help="bundle directory (default build/cerebrium/<app>-<sha>)")
    parser.add_argument("--app-name", default=None)
    parser.add_argument("--compute", default=None, help="e.g. AMPERE_A10, ADA_L4, HOPPER_H100")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    overrides = {k: v for k, v in (("app_name", args.app_name), ("compute", args.compute)) if v}
    settings = CerebriumSettings(**overrides)
    artifact, name, version = args.artifact, None, None
    if str(artifact).startswith("models:/"):
        resolved = resolve_model(artifact)
        artifact, name, version = resolved.path, resolved.name, resolved.version
        print(f"{args.artifact} -> {name} v{version} ({artifact})")
    try:
        if args.command == "deploy":
            try:
                endpoint = deploy_cerebrium(artifact, settings, bundle_dir=args.out, model_name=name, version=version)
            except DeployError as error:
                print(error)
                return 1
            print(f"live: {endpoint.url}\n  test: python scripts/test_server.py --url {endpoint.url} "
                  f"--api-key $API_KEY --gateway-token ${CEREBRIUM_GATEWAY[0]}\n  stop: {endpoint.stop_hint}")
            return 0
        bundle = stage_bundle(artifact, settings, out_dir=args.out, model_name=name, version=version)
        print(f"staged {bundle.path}")
        if args.command == "preflight":
            for note in preflight(bundle, resolve_secret(CEREBRIUM_TOKEN), settings.cli):
                print(f"ok: {note}")
            print(f"preflight passed: cd {bundle.path} && cerebrium deploy -y")
    except CerebriumError as error:
        print(error)
        return 1
    return 0
