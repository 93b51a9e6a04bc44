"""The `cerebrium` deploy target, one concern per module:

    contract.py   what the image, cerebrium.toml and the server agree on (port, probes, include list)
    bundle.py     stage the upload: Dockerfile with pinned ARGs, serving/, the model, cerebrium.toml
    preflight.py  every check that fails in seconds instead of after a remote build
    cli.py        find and run the Go `cerebrium` CLI, read its answer
    target.py     the target itself: stage -> preflight -> deploy -> /ready through the gateway
    command.py    `python -m flows.deploy.cerebrium stage|preflight|deploy`
"""

from flows.deploy.cerebrium.bundle import Bundle, dockerfile_facts, parse_dockerfile, render_toml, stage_bundle, upload_files
from flows.deploy.cerebrium.cli import parse_endpoint, resolve_cli, run_cerebrium_deploy
from flows.deploy.cerebrium.contract import CerebriumError
from flows.deploy.cerebrium.preflight import preflight, prerequisite_problems
from flows.deploy.cerebrium.target import CerebriumTarget, deploy_cerebrium

__all__ = ["Bundle", "CerebriumError", "CerebriumTarget", "deploy_cerebrium", "dockerfile_facts", "parse_dockerfile",
           "parse_endpoint", "preflight", "prerequisite_problems", "render_toml", "resolve_cli",
           "run_cerebrium_deploy", "stage_bundle", "upload_files"]
