"""The artifact contract: what an onnxship ONNX file promises, read from the file alone.

Graph:   input  "images"        uint8   [batch, H, W, 3]  (NHWC, RGB, 0..255)
         output "logits"        float32 [batch, classes]
         output "probabilities" float32 [batch, classes]  (softmax of logits)
The graph itself casts, scales to [0, 1] and normalises with the model's mean/std.

metadata_props (all strings; lists and numbers JSON-encoded) are listed in METADATA_KEYS.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

INPUT_NAME = "images"
LOGITS_NAME = "logits"
PROBABILITIES_NAME = "probabilities"

METADATA_KEYS = (
    "onnxship_version",
    "arch",
    "input_size",
    "layout",
    "resize_policy",
    "mean",
    "std",
    "labels",
    "weights_sha256",
    "exported_at",
    "opset",
)


class ArtifactError(ValueError):
    """The file is not a usable onnxship artifact; the message says what is missing or wrong."""


@dataclass(frozen=True)
class ArtifactMetadata:
    arch: str
    input_size: int
    layout: str  # "NHWC"
    resize_policy: str  # "squash" | "center_crop"
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    labels: tuple[str, ...]
    weights_sha256: str
    exported_at: str  # ISO 8601, UTC
    opset: int
    onnxship_version: str
    precision: str = "fp32"  # "fp32" | "int8" | "fp16": flows/stages/variants.py; absent in older files

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def to_props(self) -> dict[str, str]:
        """Flatten to ONNX metadata_props (string values)."""
        props = {}
        for key, value in asdict(self).items():
            props[key] = value if isinstance(value, str) else json.dumps(list(value) if isinstance(value, tuple) else value)
        return props

    @classmethod
    def from_props(cls, props: dict[str, str], source: str = "the model") -> ArtifactMetadata:
        missing = [key for key in METADATA_KEYS if key not in props]
        if missing:
            raise ArtifactError(
                f"{source} is not an onnxship artifact: metadata_props lack {', '.join(missing)} "
                "(export it with scripts/convert_to_onnx.py or the release flow)"
            )
        try:
            return cls(
                arch=props["arch"],
                input_size=int(props["input_size"]),
                layout=props["layout"],
                resize_policy=props["resize_policy"],
                mean=tuple(float(v) for v in json.loads(props["mean"])),
                std=tuple(float(v) for v in json.loads(props["std"])),
                labels=tuple(str(v) for v in json.loads(props["labels"])),
                weights_sha256=props["weights_sha256"],
                exported_at=props["exported_at"],
                opset=int(props["opset"]),
                onnxship_version=props["onnxship_version"],
                precision=props.get("precision", "fp32"),
            )
        except (ValueError, TypeError) as error:
            raise ArtifactError(f"{source} has malformed onnxship metadata: {error}") from None


def read_metadata(path: str | Path) -> ArtifactMetadata:
    """Read the metadata of an ONNX file without running it (onnxruntime only, no onnx package)."""
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: no such model file")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return session_metadata(open_session(path, options, ["CPUExecutionProvider"]), path)


def open_session(path: str | Path, options, providers: list):
    """An ONNX Runtime session on `path`, or ArtifactError naming the file and the reason."""
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: no such model file")
    try:
        return ort.InferenceSession(str(path), options, providers=providers)
    except Exception as error:  # onnxruntime raises several unrelated types for a bad file
        raise ArtifactError(f"{path}: not a loadable ONNX model: {error}") from None


def session_metadata(session, path: str | Path) -> ArtifactMetadata:
    """The onnxship metadata of an open session's model (no second session just to read it)."""
    return ArtifactMetadata.from_props(session.get_modelmeta().custom_metadata_map, source=str(path))


def file_sha256(path: str | Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()
