"""Run the Go `cerebrium` CLI: find the real binary, `cerebrium deploy -y` in the bundle with a clean
HOME and only the service-account token, and read its answer (live URL, or which step failed)."""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flows.deploy.cerebrium.bundle import Bundle
from flows.deploy.cerebrium.contract import CerebriumError
from flows.secrets import CEREBRIUM_TOKEN

log = logging.getLogger("onnxship.cerebrium")
LIVE_MARKER = "is now live!"
CLI_ENV = "CEREBRIUM_CLI"  # optional: path of the cerebrium executable to use
TOKEN_ENV = CEREBRIUM_TOKEN[0]


@dataclass
class DeployResult:
    returncode: int
    output: str
    url: str | None
    project_id: str | None
    dashboard_url: str | None
    seconds: float


def is_unbootstrapped_launcher(path: Path) -> bool:
    """The `cerebrium` PyPI package installs a Python launcher that downloads the Go CLI into
    ~/.cerebrium/bin on first use (needs internet)."""
    try:
        head = path.read_bytes()[:4096]
    except OSError:
        return False
    return head.startswith(b"#!") and b"cerebrium_cli" in head


def resolve_cli(explicit: str | None = None) -> Path:
    """The Go `cerebrium` binary to run. Order: explicit / $CEREBRIUM_CLI, the launcher's download
    in ~/.cerebrium/bin (run directly, since we run the CLI with a clean HOME), then PATH."""
    candidates: list[Path] = []
    for value in (explicit, os.environ.get(CLI_ENV)):
        if value:
            path = Path(value).expanduser()
            found = shutil.which(str(path)) if not path.is_file() else str(path)
            if not found:
                raise CerebriumError("cli", f"cerebrium CLI {value}: not found or not executable")
            return Path(found)
    downloaded = Path.home() / ".cerebrium" / "bin" / "cerebrium"
    if downloaded.is_file() and os.access(downloaded, os.X_OK):
        candidates.append(downloaded)
    on_path = shutil.which("cerebrium")
    if on_path:
        candidates.append(Path(on_path))
    for candidate in candidates:
        if not is_unbootstrapped_launcher(candidate):
            return candidate
    if candidates:
        raise CerebriumError(
            "cli", f"{candidates[0]} is the pip launcher and the real CLI has not been downloaded yet: run "
            "`cerebrium version` once on a machine with internet (it installs ~/.cerebrium/bin/cerebrium)"
        )
    raise CerebriumError(
        "cli", "the cerebrium CLI is not installed: `pip install cerebrium && cerebrium version` once with "
        f"internet, or put the binary on PATH / in ${CLI_ENV}"
    )


_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")
_URL = re.compile(r"(https?://[^\s'\"<>]+?/v4/([^/\s]+)/([A-Za-z0-9-]+))(?=[/\s]|$)")


def parse_endpoint(output: str, app_name: str | None = None) -> tuple[str, str] | None:
    """(base URL, project id) from the CLI's output: https://<host>/v4/<project-id>/<app-name>."""
    text = _ANSI.sub("", output)
    after = text.split(LIVE_MARKER, 1)[-1]
    for chunk in (after, text):
        for match in _URL.finditer(chunk):
            url, project, app = match.groups()
            if app_name is None or app == app_name:
                return url, project
    return None


_CLI_ENV_KEEP = {"PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY",
                 "http_proxy", "https_proxy", "no_proxy", "SSL_CERT_FILE", "SSL_CERT_DIR", "CEREBRIUM_ENV",
                 "CEREBRIUM_TELEMETRY_DISABLED"}


def clean_env(home: Path, token: str) -> dict[str, str]:
    """The CLI's environment: an allow-list (PATH, locale, proxies, CA certificates), a fresh HOME
    (no ~/.docker/config.json to upload, no stored login) and the service-account token; never our
    other secrets (API_KEY, CEREBRIUM_API_KEY, MLflow or cloud credentials)."""
    env = {k: v for k, v in os.environ.items() if k in _CLI_ENV_KEEP}
    env.update(HOME=str(home), XDG_CONFIG_HOME=str(home / ".config"), USERPROFILE=str(home),
               NO_COLOR="1", TERM="dumb", CEREBRIUM_SERVICE_ACCOUNT_TOKEN=token)
    return env


def run_cerebrium_deploy(
    bundle: Bundle, token: str, cli: str | Path | None = None, timeout_s: float | None = None, logger: Any = None
) -> DeployResult:
    """`cerebrium deploy -y` in the bundle; success only with exit 0 AND 'is now live!'."""
    logger = logger or log
    cli_path = Path(cli) if cli else resolve_cli(bundle.settings.cli)
    timeout_s = timeout_s or bundle.settings.deploy_timeout_s
    lines: list[str] = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="cerebrium-home-") as home:
        command = [str(cli_path), "deploy", "-y"]
        logger.info("running %s in %s (clean HOME, token from %s)", " ".join(command), bundle.path, TOKEN_ENV)
        try:
            process = subprocess.Popen(
                command, cwd=bundle.path, env=clean_env(Path(home), token), stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, errors="replace",
            )
        except OSError as error:
            raise CerebriumError("cli", f"cannot run {cli_path}: {error}") from None

        def pump() -> None:
            assert process.stdout is not None
            for raw in process.stdout:
                line = _ANSI.sub("", raw.rstrip("\n")).replace(token, "***")
                lines.append(line)
                if line.strip():
                    logger.info("cerebrium | %s", line)

        reader = threading.Thread(target=pump, name="cerebrium-output", daemon=True)
        reader.start()
        try:
            returncode = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGINT)  # the CLI cancels the remote build on SIGINT
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            reader.join(timeout=5)
            raise CerebriumError(
                "build", f"`cerebrium deploy` did not finish within {timeout_s:.0f} s; the build was cancelled. "
                f"Last output:\n{tail(lines)}"
            ) from None
        reader.join(timeout=10)
    output = "\n".join(lines)
    seconds = time.monotonic() - started
    parsed = parse_endpoint(output, bundle.settings.app_name)
    dashboard = re.search(r"App Dashboard:\s*(\S+)", output)
    result = DeployResult(returncode, output, parsed[0] if parsed else None, parsed[1] if parsed else None,
                          dashboard.group(1) if dashboard else None, seconds)
    raise_for_result(result, bundle)
    return result


def tail(lines: list[str], count: int = 15) -> str:
    kept = [line for line in lines if line.strip()][-count:]
    return "\n".join("    " + line for line in kept) or "    (no output)"


def raise_for_result(result: DeployResult, bundle: Bundle) -> None:
    output, lines = result.output, result.output.splitlines()
    lowered = output.lower()
    live = result.returncode == 0 and LIVE_MARKER in output
    if live and result.url:
        return
    if any(marker in lowered for marker in ("no project configured", "cerebrium login", "token has expired",
                                              "unauthorized", "failed to parse service account token")):
        raise CerebriumError(
            "auth", f"the CLI is not logged in / the token was refused (exit {result.returncode}): set {TOKEN_ENV} to a "
            f"valid service-account token.\n{tail(lines)}"
        )
    if result.returncode != 0:
        raise CerebriumError("build", f"`cerebrium deploy` failed with exit code {result.returncode}:\n{tail(lines)}")
    if "build failed" in lowered:  # the Go CLI shows a failed build and still exits 0
        raise CerebriumError("build", f"the remote build failed (the CLI exited 0):\n{tail(lines)}")
    if LIVE_MARKER not in output:
        cancelled = "cancel" in lowered
        raise CerebriumError(
            "cancelled" if cancelled else "build",
            ("the build was cancelled" if cancelled else "the CLI exited 0 without saying the app is live")
            + f" (exit 0 without '{LIVE_MARKER}'):\n{tail(lines)}",
        )
    if result.url is None:
        raise CerebriumError(
            "url", f"the app is live but no endpoint URL .../v4/<project-id>/{bundle.settings.app_name} was "
            f"found in the output:\n{tail(lines)}"
        )

