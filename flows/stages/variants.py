"""Reduced-precision variants of an fp32 onnxship artifact: int8 (CPU) and fp16 (GPU).

Both keep the artifact's contract: uint8 NHWC `images` in, float32 `logits` and `probabilities` out,
the preprocessing in the graph and in float32, every metadata_props key, plus `precision`.

- int8: ONNX Runtime static quantization (QDQ, per-channel QInt8 weights, QUInt8 activations,
  MinMax calibration, 7-bit weights: `reduce_range`, without which CPUs lacking VNNI saturate the
  u8 x s8 products: top-1 agreement 89.6% instead of 95.5% on an AVX2 machine). Only the model
  is quantized: the preprocessing nodes in front of the first convolution and the final softmax
  stay float. Calibration images go through the artifact's own input, decoded and resized by
  `serving.images.load_image` (the one implementation).
- fp16: `onnxruntime.transformers.float16` with the input and outputs kept as they are and the
  preprocessing and softmax blocked (float32).

    python -m flows.stages.variants models/model.onnx --precision int8 --output models/model.int8.onnx \\
        --calibration-images DIR
    python -m flows.stages.variants models/model.onnx --precision fp16 --output models/model.fp16.onnx
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

FP32, INT8, FP16 = "fp32", "int8", "fp16"
PRECISIONS = (FP32, INT8, FP16)
REDUCED = (INT8, FP16)
PRECISION_KEY = "precision"
MIN_CALIBRATION_IMAGES = 16
CALIBRATION_COUNT = 64
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
FLOAT_OPS = ("Softmax",)  # kept float32 in every variant (besides the preprocessing)


class VariantError(RuntimeError):
    """A variant could not be built; the message is the reason the gate records."""


@dataclass(frozen=True)
class BuiltVariant:
    precision: str
    path: Path
    seconds: float
    size_bytes: int
    calibration_images: int = 0
    notes: str = ""


def image_files(directory: str | Path) -> list[Path]:
    """The images of a folder: those its manifest.csv lists (labels ignored), else every image file."""
    directory = Path(directory)
    if not directory.is_dir():
        raise VariantError(f"calibration images {directory}: not a directory")
    if (directory / "manifest.csv").is_file():
        from flows.reference import ReferenceSetError, load_reference_set

        try:
            return [ref.path for ref in load_reference_set(directory)]
        except ReferenceSetError as error:
            raise VariantError(f"calibration images: {error}") from None
    return sorted(p for p in directory.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def preprocessing_nodes(model) -> list[str]:
    """Names of the nodes that run before the first Conv/MatMul/Gemm (the folded preprocessing),
    plus the float-only ops (softmax): nodes the variants keep in float32."""
    names = []
    for node in model.graph.node:
        if node.op_type in ("Conv", "MatMul", "Gemm"):
            break
        names.append(node.name)
    names += [node.name for node in model.graph.node if node.op_type in FLOAT_OPS]
    if any(not name for name in names):
        raise VariantError("the graph has unnamed preprocessing nodes; re-export it with flows.stages.export")
    return names


def copy_metadata(source_model, target_model, precision: str) -> None:
    from flows.stages.export import set_metadata

    props = {p.key: p.value for p in source_model.metadata_props}
    props[PRECISION_KEY] = precision
    set_metadata(target_model, props)
    target_model.doc_string = f"{source_model.doc_string} ({precision} variant)".strip()


class CalibrationImages:
    """onnxruntime.quantization.CalibrationDataReader over decoded images, one image per batch."""

    def __init__(self, arrays: list):
        self.arrays = arrays
        self.index = 0

    def get_next(self):
        from serving.artifact import INPUT_NAME

        if self.index >= len(self.arrays):
            return None
        self.index += 1
        return {INPUT_NAME: self.arrays[self.index - 1][None]}

    def rewind(self) -> None:
        self.index = 0


def decode_calibration(paths: Sequence[Path], size: int, policy: str, minimum: int) -> list:
    from serving.images import ImageError, load_image

    arrays, unreadable = [], []
    for path in paths:
        try:
            arrays.append(load_image(path, size, policy))
        except ImageError as error:
            unreadable.append(f"{Path(path).name} ({error})")
    if len(arrays) < minimum:
        detail = f"; unreadable: {', '.join(unreadable[:3])}" + (" ..." if len(unreadable) > 3 else "") if unreadable else ""
        raise VariantError(f"int8 calibration needs at least {minimum} readable images, got {len(arrays)} "
                           f"of {len(paths)}{detail}")
    return arrays


def build_int8(source: str | Path, output: str | Path, calibration: Sequence[Path],
               minimum: int = MIN_CALIBRATION_IMAGES) -> BuiltVariant:
    """Static QDQ quantization of `source`, calibrated on `calibration` (image paths)."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from serving.artifact import read_metadata

    started = time.perf_counter()
    meta = read_metadata(source)
    arrays = decode_calibration(calibration, meta.input_size, meta.resize_policy, minimum)
    model = onnx.load(str(source))
    keep_float = preprocessing_nodes(model)
    with tempfile.TemporaryDirectory(prefix="onnxship-int8-") as scratch:
        quantized = Path(scratch) / "model.int8.onnx"
        try:
            logging.disable(logging.WARNING)  # "consider pre-processing" on the root logger: onnxsim already did
            quantize_static(
                str(source), str(quantized), CalibrationImages(arrays), quant_format=QuantFormat.QDQ,
                per_channel=True, reduce_range=True, weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8,
                calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=keep_float,
            )
            result = onnx.load(str(quantized))
        except Exception as error:  # onnxruntime.quantization raises whatever its graph walk hits
            raise VariantError(f"int8 quantization failed: {type(error).__name__}: {first_line(error)}") from None
        finally:
            logging.disable(logging.NOTSET)
    drop_unused_initializers(result)
    copy_metadata(model, result, INT8)
    path = save(result, output)
    return BuiltVariant(INT8, path, round(time.perf_counter() - started, 2), path.stat().st_size, len(arrays),
                        f"QDQ per-channel, {len(arrays)} calibration images")


def drop_unused_initializers(model) -> None:
    """The quantizer leaves the float constants it replaced; ONNX Runtime warns about each at load."""
    used = {name for node in model.graph.node for name in node.input} | {o.name for o in model.graph.output}
    kept = [init for init in model.graph.initializer if init.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)


def build_fp16(source: str | Path, output: str | Path) -> BuiltVariant:
    """float16 weights and activations; uint8 input, float32 outputs, preprocessing and softmax in float32."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    started = time.perf_counter()
    model = onnx.load(str(source))
    try:
        converted = convert_float_to_float16(model, keep_io_types=True, node_block_list=preprocessing_nodes(model),
                                             disable_shape_infer=False)
    except VariantError:
        raise
    except Exception as error:
        raise VariantError(f"fp16 conversion failed: {type(error).__name__}: {first_line(error)}") from None
    copy_metadata(model, converted, FP16)
    path = save(converted, output)
    return BuiltVariant(FP16, path, round(time.perf_counter() - started, 2), path.stat().st_size)


def build_variant(source: str | Path, precision: str, output: str | Path,
                  calibration: Sequence[Path] = (), minimum: int = MIN_CALIBRATION_IMAGES) -> BuiltVariant:
    if precision == INT8:
        return build_int8(source, output, calibration, minimum)
    if precision == FP16:
        return build_fp16(source, output)
    raise VariantError(f"unknown precision {precision!r}: expected one of {', '.join(REDUCED)}")


def save(model, output: str | Path) -> Path:
    from flows.stages.export import ExportError, write_model

    output = Path(output)
    try:
        write_model(model, output)
    except ExportError as error:
        raise VariantError(str(error)) from None
    return output


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.stages.variants", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="an fp32 onnxship artifact")
    parser.add_argument("--precision", required=True, choices=REDUCED)
    parser.add_argument("--output", required=True, type=Path)
    parser.add_argument("--calibration-images", type=Path,
                        help="int8 (required): a folder of images, those its manifest.csv lists if it has one")
    parser.add_argument("--min-calibration-images", type=int, default=MIN_CALIBRATION_IMAGES)
    parser.add_argument("--calibration-count", type=int, default=CALIBRATION_COUNT,
                        help=f"int8: at most this many calibration images (default {CALIBRATION_COUNT})")
    args = parser.parse_args(argv)
    from serving.artifact import ArtifactError, read_metadata

    try:
        meta_precision = read_precision(args.source)
        if meta_precision != FP32:
            raise VariantError(f"{args.source} is already a {meta_precision} variant: build variants from the fp32 artifact")
        read_metadata(args.source)
        if not args.output.parent.is_dir():
            raise VariantError(f"--output: directory {args.output.parent} does not exist")
        if args.precision == INT8 and args.calibration_images is None:
            raise VariantError(f"int8 needs --calibration-images DIR: a folder of at least {args.min_calibration_images} "
                               "images like the ones the model will see (never its evaluation images)")
        calibration = image_files(args.calibration_images)[:args.calibration_count] if args.precision == INT8 else []
        built = build_variant(args.source, args.precision, args.output, calibration, args.min_calibration_images)
    except (VariantError, ArtifactError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    source_mb = os.path.getsize(args.source) / 1e6
    print(f"{built.precision} variant {built.path}: {built.size_bytes / 1e6:.1f} MB (fp32 {source_mb:.1f} MB), "
          f"built in {built.seconds:.1f} s{'; ' + built.notes if built.notes else ''}")
    return 0


def read_precision(path: str | Path) -> str:
    """The `precision` of an artifact's metadata (fp32 for artifacts exported before variants existed)."""
    from serving.artifact import read_metadata

    return read_metadata(path).precision


if __name__ == "__main__":
    sys.exit(main())
