"""Where the release's secrets come from: the environment first, then a Prefect Secret block.

    API_KEY                          the app's own key (the seed's variable; serving/ reads the same one)
    CEREBRIUM_SERVICE_ACCOUNT_TOKEN  deploys to Cerebrium (only the `cerebrium` CLI sees it)
    CEREBRIUM_API_KEY                calls the Cerebrium gateway (Authorization: Bearer)

Blocks are looked up only where a Prefect API is reachable (inside a flow run, or with
PREFECT_API_URL set), never by starting a temporary server.
"""

from __future__ import annotations

import os

APP_KEY = ("API_KEY", "onnxship-api-key")
CEREBRIUM_TOKEN = ("CEREBRIUM_SERVICE_ACCOUNT_TOKEN", "cerebrium-service-account-token")
CEREBRIUM_GATEWAY = ("CEREBRIUM_API_KEY", "cerebrium-api-key")


def masked(secret: str) -> str:
    """What may be printed of a secret: enough to tell two keys apart, never enough to use one."""
    return f"{secret[:4]}… ({len(secret)} characters)"


def secret_with_source(secret: tuple[str, str]) -> tuple[str | None, str | None]:
    """(value, where it came from) for `secret` = (environment variable, Prefect Secret block name)."""
    env_name, block_name = secret
    value = os.environ.get(env_name, "").strip()
    if value:
        return value, f"env {env_name}"
    value = secret_block(block_name)
    return (value, f"Prefect Secret {block_name}") if value else (None, None)


def resolve_secret(secret: tuple[str, str]) -> str | None:
    return secret_with_source(secret)[0]


def secret_block(block_name: str) -> str | None:
    try:
        from prefect.context import FlowRunContext

        in_flow = FlowRunContext.get() is not None
    except Exception:
        in_flow = False
    if not (in_flow or os.environ.get("PREFECT_API_URL")):
        return None
    try:
        from prefect.blocks.system import Secret

        value = Secret.load(block_name).get()
    except Exception:
        return None
    return str(value).strip() or None
