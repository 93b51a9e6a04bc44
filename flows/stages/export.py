"""Export a loaded PyTorch model to an onnxship artifact (see serving/artifact.py for the contract).

The exported graph wraps the model with its preprocessing:
    images uint8 [batch, H, W, 3] (NHWC RGB) -> float32 -> /255 -> (x - mean) / std -> NCHW
    -> model -> logits [batch, classes], probabilities = softmax(logits) [batch, classes]
so a client sends decoded, resized pixels (4x fewer bytes than float32) and nothing else needs to
know the model's normalisation. The batch axis is dynamic; the opset is fixed (DEFAULT_OPSET).
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from serving import __version__ as ONNXSHIP_VERSION
from serving.artifact import INPUT_NAME, LOGITS_NAME, PROBABILITIES_NAME, ArtifactMetadata
from serving.images import RESIZE_POLICIES
from flows.model.zoo import LoadedModel

DEFAULT_OPSET = 20  # the newest opset torch's TorchScript exporter (dynamo=False) writes
MIN_OPSET = 13
LAYOUT = "NHWC"


class ExportError(RuntimeError):
    """The model could not be exported or written; the message names the cause."""


@dataclass(frozen=True)
class ExportResult:
    path: Path
    seconds: float
    node_count: int
    metadata: ArtifactMetadata


def fold_preprocessing(model: "torch.nn.Module", mean: tuple[float, ...], std: tuple[float, ...]) -> "torch.nn.Module":
    """Wrap `model`: uint8 NHWC RGB images -> (logits, probabilities), normalisation inside."""
    import torch

    class FoldedPreprocessing(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model
            self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

        def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            x = images.permute(0, 3, 1, 2).to(torch.float32) / 255.0
            x = (x - self.mean) / self.std
            logits = self.model(x)
            return logits, torch.softmax(logits, dim=1)

    return FoldedPreprocessing().eval()


def supported_opsets() -> range:
    """Opsets this exporter writes (imports torch)."""
    from torch.onnx import _constants

    return range(MIN_OPSET, getattr(_constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", DEFAULT_OPSET) + 1)


def check_opset(opset: int) -> None:
    supported = supported_opsets()
    if opset not in supported:
        raise ExportError(
            f"opset {opset} is not supported: use {supported.start}..{supported.stop - 1} (default {DEFAULT_OPSET})"
        )


def check_output_path(output: str | Path) -> Path:
    """Refuse an output path whose directory is missing or not writable, before any work."""
    output = Path(output)
    if output.exists() and output.is_dir():
        raise ExportError(f"output {output} is a directory: give a file path such as {output / 'model.onnx'}")
    parent = output.parent if str(output.parent) else Path(".")
    if not parent.is_dir():
        raise ExportError(f"output directory {parent} does not exist: create it or choose another --output")
    try:
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".onnxship-write-test-"):
            pass
    except OSError as error:
        raise ExportError(f"output directory {parent} is not writable ({error.strerror or error})") from None
    if output.exists() and not os.access(output, os.W_OK):
        raise ExportError(f"output file {output} exists and is read-only")
    return output


def build_metadata(loaded: LoadedModel, resize_policy: str, opset: int) -> ArtifactMetadata:
    spec = loaded.spec
    return ArtifactMetadata(
        arch=spec.arch,
        input_size=spec.input_size,
        layout=LAYOUT,
        resize_policy=resize_policy,
        mean=tuple(float(v) for v in spec.mean),
        std=tuple(float(v) for v in spec.std),
        labels=spec.class_labels(),
        weights_sha256=loaded.weights_sha256,
        exported_at=datetime.now(timezone.utc).replace(microsecond=0).isoformat(),
        opset=opset,
        onnxship_version=ONNXSHIP_VERSION,
    )


def export_onnx(
    loaded: LoadedModel,
    output: str | Path,
    resize_policy: str | None = None,
    opset: int = DEFAULT_OPSET,
) -> ExportResult:
    """Export `loaded` to `output` with folded preprocessing and onnxship metadata."""
    import onnx
    import torch

    started = time.perf_counter()
    output = check_output_path(output)
    check_opset(opset)
    policy = resize_policy or loaded.spec.default_resize_policy
    if policy not in RESIZE_POLICIES:
        raise ExportError(f"unknown resize policy {policy!r}: expected one of {', '.join(RESIZE_POLICIES)}")
    metadata = build_metadata(loaded, policy, opset)
    if len(metadata.labels) != loaded.spec.num_classes:
        raise ExportError(f"{len(metadata.labels)} labels for a model with {loaded.spec.num_classes} classes")

    wrapper = fold_preprocessing(loaded.module, loaded.spec.mean, loaded.spec.std)
    size = loaded.spec.input_size
    example = torch.zeros(2, size, size, 3, dtype=torch.uint8)
    buffer = io.BytesIO()
    try:
        with torch.no_grad(), warnings.catch_warnings(), quiet_native_output():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                wrapper,
                (example,),
                buffer,
                input_names=[INPUT_NAME],
                output_names=[LOGITS_NAME, PROBABILITIES_NAME],
                dynamic_axes={name: {0: "batch"} for name in (INPUT_NAME, LOGITS_NAME, PROBABILITIES_NAME)},
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
            )
    except Exception as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ExportError(f"torch.onnx.export failed for {loaded.spec.arch} at opset {opset}: {first}") from None

    model = onnx.load_from_string(buffer.getvalue())
    model.doc_string = f"onnxship {ONNXSHIP_VERSION}: {loaded.spec.arch}, uint8 NHWC input, preprocessing folded in"
    set_metadata(model, metadata.to_props())
    write_model(model, output)
    return ExportResult(
        path=output,
        seconds=time.perf_counter() - started,
        node_count=len(model.graph.node),
        metadata=metadata,
    )


@contextlib.contextmanager
def quiet_native_output():
    """Silence file descriptors 1 and 2 while exporting: on a failure torch's TorchScript exporter
    prints the whole IR graph (thousands of lines) from C++, burying the one line that matters."""
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        saved = [os.dup(1), os.dup(2)]
    except (OSError, ValueError, AttributeError):  # no real descriptors (embedded interpreter): leave them
        yield
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 1)
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)


def set_metadata(model, props: dict[str, str]) -> None:
    """Set onnxship's metadata_props, keeping any other keys already present."""
    import onnx

    kept = [(p.key, p.value) for p in model.metadata_props if p.key not in props]
    del model.metadata_props[:]
    for key, value in [*kept, *props.items()]:
        model.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))


def write_model(model, output: Path) -> None:
    """Write atomically: a reader never sees a half-written artifact."""
    import onnx

    temporary = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    try:
        onnx.save_model(model, str(temporary))
        os.replace(temporary, output)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise ExportError(f"cannot write {output}: {error.strerror or error}") from None
