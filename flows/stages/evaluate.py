"""The variants stage: which precisions a release builds, on which images they are judged, and each
one built (flows/stages/variants.py) and compared with PyTorch (flows/stages/agreement.py).

A variant that cannot be built or run (too few evaluation or calibration images, unreadable
images, an operator the quantizer or the converter cannot handle, a file ONNX Runtime refuses)
is refused with the reason; fp32 always continues. Too few evaluation images refuse a
reduced-precision variant before any time is spent quantizing it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from flows.params import ReleaseParams
from flows.reference import ReferenceImage, ReferenceSetError, load_reference_set, reference_paths
from flows.stages.accuracy import open_classifier
from flows.stages.agreement import (Agreement, ImageSplit, TorchReference, measure_agreement, split_images,
                                    torch_reference)
from flows.stages.variants import FP16, FP32, INT8, VariantError, build_variant


@dataclass
class Variant:
    precision: str
    path: Path | None = None
    classifier: object | None = None  # serving.runtime.Classifier on CPU, None when refused before running
    agreement: Agreement | None = None
    size_bytes: int = 0
    build_s: float = 0.0
    refused: str | None = None  # why it was not built or could not be evaluated
    notes: str = ""
    speedup: float | None = None  # vs fp32, img/s at batch 1 on this machine (benchmark stage); None: not measured

    @property
    def usable(self) -> bool:
        return self.refused is None and self.classifier is not None

    def to_dict(self) -> dict:
        return {"precision": self.precision, "path": str(self.path) if self.path else None,
                "size_bytes": self.size_bytes, "build_s": self.build_s, "refused": self.refused, "notes": self.notes,
                "speedup": self.speedup, "agreement": self.agreement.to_dict() if self.agreement else None}


@dataclass
class VariantSet:
    device: str  # the deploy target's device: "cpu" or "cuda"
    split: ImageSplit
    variants: list[Variant] = field(default_factory=list)
    reference: TorchReference | None = None  # PyTorch's answers on the evaluation images

    @property
    def fp32(self) -> Variant:
        return self.variants[0]

    def get(self, precision: str) -> Variant | None:
        return next((v for v in self.variants if v.precision == precision), None)

    def to_dict(self) -> dict:
        return {"device": self.device, "images": self.split.how, "variants": [v.to_dict() for v in self.variants]}


def target_device(params: ReleaseParams) -> str:
    """Where the release's artifact will run: Cerebrium serves on GPUs; the local target on its
    `server.device` (auto: what this machine offers)."""
    if params.target == "cerebrium":
        return "cuda"
    if params.server.device != "auto":
        return params.server.device
    from serving.runtime import resolve_device

    return resolve_device("auto")


def wanted_precisions(params: ReleaseParams, device: str) -> tuple[str, ...]:
    if params.variants is not None:
        return params.variants
    return (FP32, INT8) if device == "cpu" else (FP32, FP16)


def evaluation_images(params: ReleaseParams, references: Sequence[ReferenceImage]) -> tuple[list[ReferenceImage], Path]:
    if params.eval_images is None:
        return list(references), reference_paths(params.images_dir, params.manifest)[0]
    return load_reference_set(params.eval_images), Path(params.eval_images)


def prepare_variants(params: ReleaseParams, loaded, fp32, fp32_path: Path, references: Sequence[ReferenceImage],
                     workdir: Path, say: Callable[[str], None] = print) -> VariantSet:
    """fp32 and every wanted reduced-precision variant, built and measured against PyTorch."""
    budget = params.variant_budget
    device = target_device(params)
    precisions = wanted_precisions(params, device)
    try:
        evaluation, eval_dir = evaluation_images(params, references)
    except ReferenceSetError as error:  # validation checked the folder; it changed since
        raise VariantError(f"evaluation images: {error}") from None
    split, calibration_error = ImageSplit(evaluation, [], f"{eval_dir} ({len(evaluation)} images)"), None
    if INT8 in precisions:
        try:
            split = split_images(evaluation, eval_dir, params.calibration_images, budget.calibration_count)
        except (VariantError, OSError) as error:  # the calibration folder went away or cannot be read
            calibration_error = f"calibration images: {error}"
    say(f"      target device {device}: {', '.join(precisions)}; {split.how}")
    reference = torch_reference(loaded, fp32, split.evaluation)
    result = VariantSet(device, split, [Variant(FP32, fp32_path, fp32, measure_agreement(fp32, reference),
                                                 fp32_path.stat().st_size)], reference)
    for precision in precisions[1:]:
        variant = Variant(precision)
        result.variants.append(variant)
        if len(split.evaluation) < budget.min_eval_images:
            variant.refused = (
                f"only {len(split.evaluation)} evaluation images (min {budget.min_eval_images}): not built; give "
                f"--eval-images DIR, a folder of at least {budget.min_eval_images} images like the ones the model "
                "will see, with a manifest.csv (file[,class_index]; labels optional)")
            continue
        try:
            if precision == INT8 and calibration_error:
                raise VariantError(calibration_error)
            built = build_variant(fp32_path, precision, workdir / f"model.{precision}.onnx", split.calibration,
                                  budget.min_calibration_images)
            variant.path, variant.size_bytes, variant.build_s, variant.notes = (
                built.path, built.size_bytes, built.seconds, built.notes)
            variant.classifier = open_classifier(built.path, like=fp32)
            variant.agreement = measure_agreement(variant.classifier, reference)
        except VariantError as error:
            variant.refused = str(error)
        except Exception as error:  # whatever a variant does wrong, fp32 continues
            variant.refused = f"{precision} could not be run: {type(error).__name__}: {str(error).strip()[:300]}"
        variant.classifier = variant.classifier if variant.refused is None else None
        a = variant.agreement
        say(f"      {precision}: " + (f"refused: {variant.refused}" if variant.refused else
                                      f"built in {variant.build_s:.1f} s, {variant.size_bytes / 1e6:.1f} MB, top-1 "
                                      f"agreement {a.top1_agreement:.1%} on {a.images} images"))
    return result
