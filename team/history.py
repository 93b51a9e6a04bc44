"""Carry a local registry history (mlruns/, what `make release` wrote before team mode) into the
team's MLflow tracking server.

    eval "$(make -s team-env)"
    make team-import                               # from sqlite:///mlruns/mlflow.db
    make team-import FROM=sqlite:///path/to/mlflow.db

For every version of the registered model, oldest first: the release run (run name, tags, params,
the last value of every metric, its artifacts: parity report, benchmark, model card, ...) is
created again in the experiment of the same name on the server, the ONNX file is logged and
registered as a new version with the same version tags plus `imported.from`. The aliases
(`champion`, `previous`, `candidate`) follow their versions when the team registry had no version
of that model yet; otherwise the team's aliases stay as they are. Run it again and it skips what it
already imported. Version numbers are the server's own (the order is kept). Not carried: other
runs (smoke tests), metric histories (last values only).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from team.config import TeamError

IMPORTED_FROM = "imported.from"


def origin(source: str, version: str) -> str:
    return f"{source}#v{version}"


def import_local(source: str | None, model_name: str) -> int:
    from mlflow.entities import Metric, Param
    from mlflow.exceptions import MlflowException

    from flows import registry
    from serving.artifact import file_sha256
    from serving.model_uri import DEFAULT_TRACKING_URI

    source = source or DEFAULT_TRACKING_URI
    target = os.environ.get("MLFLOW_TRACKING_URI", "")
    if not target.startswith(("http://", "https://")):
        raise TeamError("MLFLOW_TRACKING_URI must name the team's tracking server (http://...): "
                        "make team-up, then eval \"$(make -s team-env)\"", 2)
    db = registry.sqlite_path(source)
    if db is not None and not db.is_file():
        raise TeamError(f"{source}: no such local store ({db} does not exist)", 2)
    local = registry.connect(source)
    versions = sorted(local.search_model_versions(f"name='{model_name}'"), key=lambda mv: int(mv.version))
    if not versions:
        raise TeamError(f"{source}: no registered model {model_name!r} to import", 2)
    local_aliases = registry.aliases(local, model_name)
    team = registry.connect(target)
    try:
        existing = team.search_model_versions(f"name='{model_name}'")
    except MlflowException:
        existing = []
    done = {mv.tags.get(IMPORTED_FROM): str(mv.version) for mv in existing if mv.tags.get(IMPORTED_FROM)}
    team_was_empty = not existing
    team_aliases = registry.aliases(team, model_name)  # registering moves @candidate: put it back after
    mapping: dict[str, str] = {}
    imported = 0
    for mv in versions:
        key = origin(source, mv.version)
        if key in done:
            mapping[str(mv.version)] = done[key]
            print(f"v{mv.version}: already imported as v{done[key]}")
            continue
        run = local.get_run(mv.run_id) if mv.run_id else None
        experiment_name = local.get_experiment(run.info.experiment_id).name if run else model_name
        experiment_id = registry.ensure_experiment(team, experiment_name)
        tags = {**(run.data.tags if run else {}), IMPORTED_FROM: key}
        tags = {k: v for k, v in tags.items() if not k.startswith("mlflow.")}  # system tags: the server sets its own
        run_id = team.create_run(experiment_id, run_name=run.info.run_name if run else f"import v{mv.version}",
                                 tags=tags, start_time=run.info.start_time if run else None).info.run_id
        with tempfile.TemporaryDirectory(prefix="onnxship-import-") as tmp:
            if run:
                team.log_batch(run_id, params=[Param(k, v) for k, v in run.data.params.items()],
                               metrics=[Metric(k, v, run.info.start_time or 0, 0) for k, v in run.data.metrics.items()])
                artifacts = Path(tmp) / "artifacts"
                artifacts.mkdir()
                local.download_artifacts(mv.run_id, "", str(artifacts))
                if any(artifacts.iterdir()):
                    team.log_artifacts(run_id, str(artifacts))
            # models:/ URIs resolve through MLflow's global registry URI: point it at each store in turn
            local = registry.connect(source)
            onnx = registry.download_version(local, model_name, str(mv.version), Path(tmp) / "model")
            team = registry.connect(target)
            version_tags = {**dict(mv.tags or {}), IMPORTED_FROM: key}
            registered = registry.register_release(team, model_name, experiment_id, run_id, onnx, version_tags)
            back = registry.download_version(team, model_name, registered.version, Path(tmp) / "check")
            if file_sha256(back) != file_sha256(onnx):  # what the server serves is what the local store held
                raise TeamError(f"v{mv.version}: the file registered as v{registered.version} differs from the local one")
        status = run.info.status if run and run.info.status in ("FINISHED", "FAILED", "KILLED") else "FINISHED"
        registry.end_run(team, run_id, status)
        mapping[str(mv.version)] = registered.version
        imported += 1
        print(f"v{mv.version}: imported as v{registered.version} (run {run_id}, sha256 {registered.sha256[:12]}, checked)")
    if team_was_empty:
        for alias, version in local_aliases.items():
            if version in mapping:
                team.set_registered_model_alias(model_name, alias, mapping[version])
        moved = ", ".join(f"@{a} -> v{mapping[v]}" for a, v in sorted(local_aliases.items()) if v in mapping)
        print(f"aliases: {moved or 'none'}")
    else:
        candidate = team_aliases.get(registry.CANDIDATE)
        if candidate is not None:
            team.set_registered_model_alias(model_name, registry.CANDIDATE, candidate)
        elif imported:
            team.delete_registered_model_alias(model_name, registry.CANDIDATE)
        print(f"aliases: the team registry already had {model_name}; its aliases stay as they are")
    print(f"imported {imported} version(s) of {model_name} from {source} into {target}")
    return 0
