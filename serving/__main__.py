"""`python -m serving --model PATH|models:/name@alias`: start the LitServe server.

Start-up checks happen here, in the main process, before any worker is spawned: configuration
and authentication, the model resolves and honours the artifact contract, its sha256 matches
`--expected-sha256` when given, and the device is usable. A failed check exits with status 2 and
a message that names the fix. SIGTERM (what Docker and Kubernetes send, also to a Python PID 1,
which has no default handler) triggers LitServe's graceful shutdown.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

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
    """SIGTERM and SIGINT both stop the server gracefully.

    SIGINT gets Python's handler explicitly: a process inherits an ignored SIGINT from a shell that
    started it as a background job (`nohup python -m serving &`, CI scripts), and Python then leaves
    it ignored, so the image's STOPSIGNAL and Ctrl-C would do nothing."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    main_pid = os.getpid()

    def on_sigterm(signum, frame):
        if os.getpid() != main_pid:  # a forked helper inherited this handler: die as usual
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        log.info("SIGTERM received: shutting down gracefully")
        raise KeyboardInterrupt  # LitServer.run turns this into its graceful shutdown

    signal.signal(signal.SIGTERM, on_sigterm)


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
    server = None
    try:
        config, path, metadata, sha256, device = prepare(config)
        from serving.server import ModelInfo, build_server

        info = ModelInfo(config, path, metadata, sha256, device, state_dir)
        if config.no_auth:
            log.warning(NO_AUTH_BANNER)
        log.info(
            "serving %s (%s, sha256 %s) on %s:%d: device %s, %d worker(s), %d intra-op thread(s) each, "
            "max batch %d, batch timeout %.3fs, auth %s",
            path.name, metadata.arch, sha256[:12], config.host, config.port, device, config.workers,
            config.intra_op_threads or 0, config.max_batch_size, config.batch_timeout,
            "off" if config.no_auth else "API key",
        )
        server = build_server(config, info)
        server.run(
            host=config.host,
            port=config.port,
            num_api_servers=config.api_servers,
            log_level=config.log_level,
            generate_client_file=False,
            access_log=False,
        )
        return 0
    except StartupError as error:
        log.error("cannot start: %s", error)
        return 2
    except KeyboardInterrupt:  # a signal before LitServe's own handling was in place
        for worker in getattr(server, "inference_workers", None) or []:
            if worker.is_alive():
                worker.terminate()
        return 0
    except RuntimeError as error:  # e.g. LitServe: "One or more workers failed to start"
        log.error("cannot start: %s", error)
        return 1
    finally:
        shutil.rmtree(state_dir, ignore_errors=True)
        remove_multiprocess_dir(metrics_dir)


def main(argv: list[str] | None = None) -> int:
    from serving.config import ConfigError, load_config

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
