"""A stand-in for the Go `cerebrium` CLI (tests only; the one sanctioned fake of the project).

Installed by tests/deploy/conftest.py as an executable named `cerebrium` on PATH. It reads its
script from `fake_cerebrium.json` next to itself, records how it was called (argv, cwd, the
environment, the files it would upload, the toml), and answers like the real CLI does in
non-interactive mode:

    mode "live"           exit 0, "... is now live!" and the endpoint URL; the "deployed app" is a
                          real server started from the bundle the way the image would start it
                          (Dockerfile WORKDIR = the bundle, its ENV, its CMD), behind the test's
                          gateway URL https?://host/v4/<project>/<app>
    mode "build-failed"   exit 1 after build logs, "Error: build failed with status: failed"
    mode "build-failed-exit0"  the same text with exit 0 (what the Go CLI really does: "silent" error)
    mode "cancelled"      exit 0, "Build cancelled", never "live"
    mode "hang"           a build that never finishes; SIGINT cancels it
    mode "not-logged-in"  exit 1, "no project configured. Please run 'cerebrium login' first"
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONFIG = json.loads((HERE / "fake_cerebrium.json").read_text())


def record(data: dict) -> None:
    Path(CONFIG["record"]).write_text(json.dumps(data, indent=2))


def dockerfile_runtime(text: str) -> tuple[dict[str, str], list[str]]:
    """ENV (with ARG defaults substituted) and CMD of a Dockerfile, as `docker run` would see them."""
    joined = re.sub(r"\\\n", " ", text)
    args: dict[str, str] = {}
    env: dict[str, str] = {}
    cmd: list[str] = []
    for line in joined.splitlines():
        line = line.strip()
        if line.startswith("ARG "):
            name, _, default = line[4:].partition("=")
            args[name.strip()] = default.strip()
        elif line.startswith("ENV "):
            for key, value in re.findall(r"(\w+)=(\S*)", line[4:]):
                env[key] = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), env.get(m.group(1), "")), value)
        elif line.startswith("CMD "):
            cmd = json.loads(line[4:])
    return env, cmd


def previous_app_pids() -> list[int]:
    """Every app this fake ever started in this test, so the fixture can stop them all by PID."""
    path = Path(CONFIG["record"])
    return json.loads(path.read_text()).get("app_pids", []) if path.is_file() else []


def stop_apps(pids: list[int]) -> None:
    from support import stop_process_group  # tests/support.py, copied beside this script

    for pid in pids:
        stop_process_group(pid)


def start_app(bundle: Path) -> int:
    env, cmd = dockerfile_runtime((bundle / "Dockerfile").read_text())
    if cmd[:1] == ["python"]:
        cmd = [sys.executable, *cmd[1:]]
    run_env = {"PATH": os.environ.get("PATH", ""), "HOME": str(bundle), **env}
    run_env.update(CONFIG.get("app_env", {}))  # the dashboard secrets (API_KEY) and the CPU override
    log = open(CONFIG["app_log"], "ab")
    process = subprocess.Popen(cmd, cwd=bundle, env=run_env, stdout=log, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL, start_new_session=True)
    return process.pid


def main(argv: list[str]) -> int:
    cwd = Path.cwd()
    files = sorted(p.relative_to(cwd).as_posix() for p in cwd.rglob("*") if p.is_file())
    home = Path(os.environ.get("HOME", ""))
    data = {
        "argv": argv,
        "cwd": str(cwd),
        "home": str(home),
        "home_files": sorted(p.name for p in home.rglob("*")) if home.is_dir() else None,
        "token_present": bool(os.environ.get("CEREBRIUM_SERVICE_ACCOUNT_TOKEN")),
        "token": os.environ.get("CEREBRIUM_SERVICE_ACCOUNT_TOKEN"),
        "docker_config": os.environ.get("DOCKER_CONFIG"),
        "other_secrets": sorted(k for k in ("API_KEY", "CEREBRIUM_API_KEY", "MLFLOW_TRACKING_URI") if k in os.environ),
        "bundle_files": files,
        "toml": (cwd / "cerebrium.toml").read_text() if (cwd / "cerebrium.toml").is_file() else None,
        "app_pids": previous_app_pids(),
    }
    record(data)
    if argv[:1] != ["deploy"]:
        print(f"Error: unknown command {argv[:1]} for fake cerebrium", file=sys.stderr)
        return 2
    mode = CONFIG["mode"]
    if mode == "not-logged-in" or not data["token_present"]:
        print("Error: no project configured. Please run 'cerebrium login' first", file=sys.stderr)
        return 1
    config = tomllib.loads(data["toml"])["cerebrium"]
    name = config["deployment"]["name"]
    dockerfile = cwd / config["runtime"]["custom"]["dockerfile_path"]
    if not dockerfile.is_file():
        print(f"Error: dockerfile not found at path: {dockerfile}", file=sys.stderr)
        return 1
    size = sum((cwd / f).stat().st_size for f in files)
    print(f"✓ Loaded {len(files)} files")
    print(f"✓ Created zip ({size / 1e6:.1f} MB)")
    print("✓ Created app (Build ID: fake-build-0001)")
    print(f"Uploading to Cerebrium ({size / 1e6:.1f} MB)...")
    print("✓ Uploaded to Cerebrium")
    print("Building app...")
    print("Step 1/12 : FROM python:3.11-slim-bookworm")
    if mode in ("build-failed", "build-failed-exit0"):
        print("ERROR: Could not find a version that satisfies the requirement onnxruntime-gpu==9.9.9")
        print("✗ Error: build failed with status: failed")
        return 1 if mode == "build-failed" else 0  # the Go CLI marks this error "silent": exit 0
    if mode == "hang":  # a build that never ends; SIGINT cancels it like the real CLI does
        import signal
        import time

        def cancel(signum, frame):
            print("\nReceived termination signal, cancelling deployment...")
            print("✓ Deployment cancelled", flush=True)
            sys.exit(1)

        signal.signal(signal.SIGINT, cancel)
        print("Step 2/12 : RUN pip install ...", flush=True)
        time.sleep(120)
        return 1
    if mode == "cancelled":
        print("⚠ Build cancelled")
        return 0
    stop_apps(data["app_pids"])  # a new live version replaces the running one, as on Cerebrium
    data["app_pids"].append(start_app(cwd))
    record(data)
    project = CONFIG["project"]
    print("✓ Build complete!")
    print()
    print(f"\x1b[32m✓ {name} is now live!\x1b[0m")
    print()
    print(f"App Dashboard: https://dashboard.cerebrium.ai/projects/{project}/apps/{project}-{name}")
    print("\nEndpoint:")
    print(f"POST {CONFIG['gateway_url']}/v4/{project}/{name}/{{function_name}}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
