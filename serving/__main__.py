"""`python -m serving --model PATH|models:/name@alias`: start the LitServe server.

Start-up checks happen here, in the main process, before any worker is spawned: configuration
and authentication, the model resolves and honours the artifact contract, its sha256 matches
`--expected-sha256` when given, and the device is usable. A failed check exits with status 2 and
a message that names the fix. Then serving/supervisor.py runs the HTTP processes and the
inference workers; SIGTERM/SIGINT (to this process or its whole group) drain the server.
"""

from __future__ import annotations

import logging
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from serving.processes import process_age

# the process's start on the monotonic clock: "ready in X s" counts the interpreter's start-up too
PROCESS_START = time.monotonic() - (process_age() or 0.0)
log = logging.getLogger("serving")

NO_AUTH_BANNER = """
!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!
!!  AUTHENTICATION DISABLED (--no-auth): anyone who can reach this port    !!
!!  can run predictions. Set API_KEY and drop --no-auth for any real use.  !!
!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!
"""


class StartupError(RuntimeError):
    pass


def install_signal_handlers() -> None:
    """Until the supervisor takes over (it installs its own handlers), SIGTERM and SIGINT end the
    start-up quietly (exit 0). SIGINT gets a handler explicitly: a process inherits an ignored
    SIGINT from a shell that started it as a background job, and Python then leaves it ignored."""
    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)


def prepare(config):
    """Resolve, verify and describe the model; returns (config resolved for the device, ModelInfo)."""
    from dataclasses import replace

    from serving.artifact import ArtifactError, file_sha256, read_metadata
    from serving.model_uri import ModelUriError, resolve_model
    from serving.runtime import DeviceError, resolve_device

    try:
        resolved = resolve_model(config.model)
        metadata = read_metadata(resolved.path)
        device = resolve_device(config.device)
    except (ModelUriError, ArtifactError, DeviceError) as error:
        raise StartupError(str(error)) from None
    sha256 = file_sha256(resolved.path)
    if config.expected_sha256 and sha256 != config.expected_sha256.lower():
        raise StartupError(
            f"{resolved.path}: sha256 {sha256} does not match the expected {config.expected_sha256} "
            "(--expected-sha256 / ONNXSHIP_EXPECTED_SHA256 / MODEL_SHA256): the file is corrupt or not "
            "the released artifact"
        )
    config = replace(
        config.resolved(device),
        model_name=config.model_name or resolved.name,
        model_version=config.model_version or resolved.version,
        model_run_id=config.model_run_id or resolved.run_id,
    )
    return config, resolved.path, metadata, sha256, device


def serve(config) -> int:
    from serving.metrics import prepare_multiprocess_dir, remove_multiprocess_dir

    metrics_dir = prepare_multiprocess_dir()  # before prometheus_client is imported anywhere
    state_dir = Path(tempfile.mkdtemp(prefix="onnxship-workers-"))
    try:
        config, path, metadata, sha256, device = prepare(config)
        from serving.api import ClassifierAPI
        from serving.app import ModelInfo
        from serving.handoff import SharedState
        from serving.runtime import visible_gpu_count
        from serving.supervisor import Supervisor, bind, worker_devices

        info = ModelInfo(config, path, metadata, sha256, device, state_dir, PROCESS_START)
        devices = worker_devices(device, config.workers, visible_gpu_count() if device == "cuda" else 0)
        api = ClassifierAPI(path, device=device, intra_op_threads=config.intra_op_threads, gpu=config.gpu_settings(),
                            max_batch_size=config.max_batch_size, batch_timeout=config.batch_timeout,
                            state_dir=state_dir,
                            spinning=config.ort_spinning)
        size = metadata.input_size
        state = SharedState(config.api_servers, -(-config.max_queued_images // config.api_servers), len(devices),
                            (size, size, 3))
        try:
            sock = bind(config.host, config.port)
        except OSError as error:
            raise StartupError(f"cannot listen on {config.host}:{config.port}: {error.strerror or error}") from None
        if config.no_auth:
            log.warning(NO_AUTH_BANNER)
        log.info(
            "serving %s (%s, sha256 %s) on %s:%d: device %s, %d worker(s), %d intra-op thread(s) each, "
            "max batch %d, batch timeout %.3fs, %d HTTP process(es), admission bound %d images, "
            "request timeout %gs, auth %s",
            path.name, metadata.arch, sha256[:12], config.host, config.port, device, len(devices),
            config.intra_op_threads or 0, config.max_batch_size, config.batch_timeout, config.api_servers,
            state.total_slots, config.request_timeout, "off" if config.no_auth else "API key",
        )
        return Supervisor(config, info, api, state, devices).run(sock)
    except StartupError as error:
        log.error("cannot start: %s", error)
        return 2
    except KeyboardInterrupt:  # a stop signal during start-up: nothing to drain yet
        return 0
    finally:
        shutil.rmtree(state_dir, ignore_errors=True)
        remove_multiprocess_dir(metrics_dir)


def print_openapi(config) -> int:
    """The document GET /openapi.json serves (with --docs), without starting a server."""
    import json

    from serving.openapi import build_document

    num_classes = None
    if config.model:
        from serving.artifact import ArtifactError, read_metadata
        from serving.model_uri import ModelUriError, resolve_model

        try:
            num_classes = read_metadata(resolve_model(config.model).path).num_classes
        except (ModelUriError, ArtifactError) as error:
            print(f"python -m serving --print-openapi: {error}", file=sys.stderr)
            return 2
    print(json.dumps(build_document(config, num_classes), indent=2, ensure_ascii=False))
    return 0


def main(argv: list[str] | None = None) -> int:
    from serving.config import ConfigError, build_parser, load_config

    if build_parser().parse_args(argv).print_openapi:
        try:
            return print_openapi(load_config(argv, check=False))
        except ConfigError as error:
            print(f"python -m serving: {error}", file=sys.stderr)
            return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(argv)
    except ConfigError as error:
        print(f"python -m serving: {error}", file=sys.stderr)
        return 2
    logging.getLogger().setLevel(config.log_level.upper())
    install_signal_handlers()
    return serve(config)


if __name__ == "__main__":
    sys.exit(main())
