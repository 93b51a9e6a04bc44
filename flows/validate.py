"""The release's first stage: check every input the release will touch, before any work.

Unknown architecture, missing/empty weights, a missing/empty/malformed manifest or one naming
missing files, an unknown deploy target or one that is not ready (the local port in use, Cerebrium's
keys or CLI missing), an output directory or MLflow store that cannot be written. All problems are
listed at once in one `ParameterError`; nothing has been exported or registered yet.

`python -m flows.release` checks before starting Prefect (a bad input fails in a second, not after
the temporary Prefect API's 20 s start) and the flow checks again only if these exact parameters were
not checked by this process moments before (`validate_once`).
"""

from __future__ import annotations

import importlib
import os
import time
from pathlib import Path

from flows.params import ParameterError, ReleaseParams

RECHECK_AFTER_S = 60.0  # the world (ports, files) may change; a check older than this is redone
_recent: dict[str, tuple[float, list[str]]] = {}


def validate_once(params: ReleaseParams) -> list[str]:
    """`validate_release_params`, unless this process validated the same parameters moments ago."""
    key = params.model_dump_json()
    checked = _recent.get(key)
    if checked and time.monotonic() - checked[0] < RECHECK_AFTER_S:
        return checked[1]
    notes = validate_release_params(params)
    _recent[key] = (time.monotonic(), notes)
    return notes


def validate_release_params(params: ReleaseParams) -> list[str]:
    """Check every input the release will touch; raise ParameterError listing all problems.

    Returns notes (non-fatal observations) for the log.
    """
    from flows.deploy import get_target

    problems: list[str] = []
    notes: list[str] = []
    checks = [check_arch, check_weights, check_references, check_eval_images, check_calibration_images, check_output_dir, check_mlflow_store]
    try:
        checks.append(get_target(params.target).check)
    except ParameterError as error:
        problems.append(str(error))
    for check in checks:
        try:
            note = check(params)
        except ParameterError as error:
            problems.append(str(error))
        else:
            if note:
                notes.append(note)
    if problems:
        raise ParameterError("invalid release parameters:\n  - " + "\n  - ".join(problems))
    return notes


def check_arch(params: ReleaseParams) -> None:
    from flows.model.zoo import ARCHITECTURES

    arch = params.arch
    if arch in ARCHITECTURES:
        if ARCHITECTURES[arch].bundled_weights is None and params.weights is None and not params.random_init:
            raise ParameterError(
                f"arch {arch!r} has no bundled weights: pass a state dict (--weights PATH; parameter weights) or "
                "ask for seeded random weights (--random-init; parameter random_init=true), which the gate rejects"
            )
        return
    if ":" in arch:
        module_name, _, attribute = arch.partition(":")
        try:
            module = importlib.import_module(module_name)
        except Exception as error:
            raise ParameterError(f"arch {arch!r}: cannot import module {module_name!r}: {error}") from None
        if not callable(getattr(module, attribute, None)):
            raise ParameterError(f"arch {arch!r}: module {module_name!r} has no callable {attribute!r}")
        return
    raise ParameterError(
        f"unknown arch {arch!r}: expected one of {', '.join(sorted(ARCHITECTURES))} or 'package.module:callable'"
    )


def check_weights(params: ReleaseParams) -> None:
    weights = params.weights
    if weights is None:
        return
    if not weights.exists():
        raise ParameterError(f"weights {weights}: no such file (pass a PyTorch state dict, or omit it for the default)")
    if not weights.is_file():
        raise ParameterError(f"weights {weights}: not a file")
    if not os.access(weights, os.R_OK):
        raise ParameterError(f"weights {weights}: not readable (permission denied)")
    if weights.stat().st_size == 0:
        raise ParameterError(f"weights {weights}: empty file (0 bytes)")


def check_references(params: ReleaseParams) -> None:
    from flows.reference import ReferenceSetError, load_references, reference_paths

    _, manifest = reference_paths(params.images_dir, params.manifest)
    if not manifest.is_file():
        raise ParameterError(f"reference manifest {manifest}: no such file")
    try:
        references = load_references(params.images_dir, params.manifest)
    except ReferenceSetError as error:
        raise ParameterError(f"reference manifest {manifest}: {error}") from None
    if not references:
        raise ParameterError(f"reference manifest {manifest}: lists no images (add rows: file,class_index,...)")
    missing = [str(ref.path) for ref in references if not Path(ref.path).is_file()]
    if missing:
        raise ParameterError(f"reference manifest {manifest}: names missing files: {', '.join(missing)}")
    if not any(ref.expected_class is not None for ref in references):
        raise ParameterError(
            f"reference manifest {manifest}: no image has an expected class, so accuracy cannot be gated"
        )


def check_eval_images(params: ReleaseParams) -> None:
    """--eval-images: a folder whose manifest.csv lists existing images (labels optional)."""
    from flows.reference import ReferenceSetError, load_reference_set

    if params.eval_images is not None:
        if not params.eval_images.is_dir():
            raise ParameterError(f"eval_images {params.eval_images}: no such directory (a folder of images with a "
                                 "manifest.csv: file[,class_index])")
        try:
            load_reference_set(params.eval_images)
        except ReferenceSetError as error:
            raise ParameterError(f"eval_images {params.eval_images}: {error}") from None


def check_calibration_images(params: ReleaseParams) -> None:
    if params.calibration_images is not None and not params.calibration_images.is_dir():
        raise ParameterError(f"calibration_images {params.calibration_images}: no such directory (a folder of images, "
                             "never the evaluation images)")


def check_output_dir(params: ReleaseParams) -> None:
    existing = nearest_existing(params.output_dir)
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ParameterError(f"output_dir {params.output_dir}: cannot be created or written ({existing} is read-only)")


def nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def check_mlflow_store(params: ReleaseParams) -> None:
    """Fail early when the MLflow store cannot be written (sqlite file / local artifact root)."""
    from flows.registry import local_store_paths, resolve_tracking_uri

    uri = resolve_tracking_uri(params.tracking_uri)
    for path in local_store_paths(uri):
        probe = nearest_existing(path)
        if probe.is_file() and probe != path.absolute():
            raise ParameterError(f"MLflow store {uri}: {path} cannot be created: {probe} is a file, not a directory")
        target = probe if probe.is_dir() else probe.parent
        writable = os.access(target, os.W_OK | os.X_OK) and (not probe.is_file() or os.access(probe, os.W_OK))
        if not writable:
            raise ParameterError(
                f"MLflow store {uri}: {path} cannot be written ({probe} is read-only); "
                "fix the permissions or set MLFLOW_TRACKING_URI to a writable store"
            )
