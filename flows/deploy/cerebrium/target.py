"""The `cerebrium` deploy target: stage a bundle, preflight it, run `cerebrium deploy`, wait until live.

    stage_bundle(artifact, settings)   bundle.py: exactly what Cerebrium builds
    preflight(bundle, token)           preflight.py: every check that can fail in seconds
    run_cerebrium_deploy(bundle, ...)  cli.py: `cerebrium deploy -y` with a clean HOME and the token
    deploy_cerebrium(artifact, ...)    here: all of the above, then /ready through the Cerebrium gateway

Keys (flows/secrets.py; README.md, "Deploy to Cerebrium" has the full picture):
    CEREBRIUM_SERVICE_ACCOUNT_TOKEN  deploys (the CLI)       Prefect Secret `cerebrium-service-account-token`
    CEREBRIUM_API_KEY                calls (gateway, Bearer) Prefect Secret `cerebrium-api-key`
    API_KEY                          the app's own key       Prefect Secret `onnxship-api-key`
                                     (X-API-Key; set the same value as the secret API_KEY in the
                                     Cerebrium dashboard so the server inside the image sees it)
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from flows.deploy.base import DeployError, Endpoint, ModelVersion
from flows.deploy.cerebrium.bundle import stage_bundle
from flows.deploy.cerebrium.cli import run_cerebrium_deploy
from flows.deploy.cerebrium.contract import READY_PATH, CerebriumError
from flows.deploy.cerebrium.preflight import preflight, prerequisite_problems
from flows.params import CerebriumSettings, ParameterError, ReleaseParams
from flows.secrets import APP_KEY, CEREBRIUM_GATEWAY, CEREBRIUM_TOKEN, resolve_secret, secret_with_source
from serving.client import ClassifierClient, ClientError

log = logging.getLogger("onnxship.cerebrium")


class CerebriumTarget:
    name = "cerebrium"

    def check(self, params: ReleaseParams) -> str | None:
        """The keys and the CLI, before a release spends minutes on export and benchmarks."""
        problems = prerequisite_problems(params.cerebrium)
        if problems:
            raise ParameterError("deploy target 'cerebrium' is not ready: " + "; ".join(problems))
        return None

    def deploy(self, artifact: Path, params: ReleaseParams, model: ModelVersion) -> Endpoint:
        return deploy_cerebrium(artifact, params.cerebrium, model_name=model.name, version=model.version)


def deploy_cerebrium(
    artifact_path: str | Path,
    settings: CerebriumSettings | None = None,
    *,
    bundle_dir: str | Path | None = None,
    logger: Any = None,
    model_name: str | None = None,
    version: str | None = None,
) -> Endpoint:
    """Stage, preflight, deploy, wait for /ready through the gateway; return the Endpoint.

    Raises DeployError whose message starts with 'cerebrium <step>:' (step is one of stage,
    preflight, cli, auth, build, cancelled, url, ready); the CerebriumError is its __cause__.
    """
    logger = logger or run_logger()
    settings = settings or CerebriumSettings()
    try:
        token = resolve_secret(CEREBRIUM_TOKEN)
        app_key, key_source = secret_with_source(APP_KEY)
        if not app_key:
            raise CerebriumError(
                "preflight", f"no app API key: set {APP_KEY[0]} (or Prefect Secret '{APP_KEY[1]}') and the same "
                "value as secret API_KEY in the Cerebrium dashboard"
            )
        gateway = resolve_secret(CEREBRIUM_GATEWAY)
        if not gateway:
            gateway = token
            logger.warning("%s not set: calling the endpoint with the service-account token as Bearer",
                           CEREBRIUM_GATEWAY[0])
        bundle = stage_bundle(artifact_path, settings, out_dir=bundle_dir, model_name=model_name, version=version)
        logger.info("staged %s (artifact sha256 %s)", bundle.path, bundle.artifact_sha256[:12])
        for note in preflight(bundle, token, settings.cli):
            logger.info("preflight: %s", note)
        result = run_cerebrium_deploy(bundle, token, timeout_s=settings.deploy_timeout_s, logger=logger)
        logger.info("deployed %s in %.0f s: %s", settings.app_name, result.seconds, result.url)
        wait_until_ready(result.url, app_key, gateway, settings.ready_timeout_s, logger)
    except CerebriumError as error:
        raise DeployError(str(error)) from error

    app_id = f"{result.project_id}-{settings.app_name}"
    return Endpoint(
        url=result.url,
        target="cerebrium",
        api_key=app_key,
        gateway_token=gateway,
        details={
            "project_id": result.project_id, "app_name": settings.app_name, "app_id": app_id,
            "api_key_source": key_source, "dashboard_url": result.dashboard_url, "compute": settings.compute,
            "gpu_count": settings.gpu_count, "region": settings.region, "artifact_sha256": bundle.artifact_sha256,
            "bundle": str(bundle.path), "upload_bytes": bundle.size_bytes, "deploy_seconds": round(result.seconds, 1),
            "model_name": model_name, "version": version,
        },
        stop_hint=(f"cerebrium apps delete {app_id}   (or keep it: with min_replicas=0 idle replicas stop "
                   f"after {settings.cooldown} s)"),
    )


def run_logger() -> Any:
    """Prefect's run logger inside a flow or task run (so the CLI's output lands in the Prefect
    logs and the UI), this module's logger elsewhere."""
    try:
        from prefect import get_run_logger
        from prefect.context import FlowRunContext, TaskRunContext

        if FlowRunContext.get() or TaskRunContext.get():
            return get_run_logger()
    except Exception:
        pass
    return log


def wait_until_ready(url: str, api_key: str | None, gateway_token: str | None, timeout_s: float, logger: Any = None) -> None:
    """Poll GET <url>/ready through the gateway until 200 (cold start: image pull + model load)."""
    logger = logger or log
    client = ClassifierClient(url, api_key=api_key, gateway_token=gateway_token, timeout=30.0)
    try:
        client.wait_until_ready(timeout_s)
    except (ClientError, TimeoutError, OSError) as error:
        raise CerebriumError(
            "ready", f"{url}{READY_PATH} did not answer 200 within {timeout_s:.0f} s: {error}. The replica is up but "
            "the model is not serving: check the app logs in the dashboard (sha256 mismatch, or CUDA missing: "
            "the server refuses readiness when the GPU was asked for and ONNX Runtime is not on CUDA)"
        ) from None
    logger.info("%s%s: ready", url, READY_PATH)
