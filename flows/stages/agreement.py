"""Evaluation of every variant against the PyTorch model on the evaluation images.

The images are decoded once by the server's `load_image` (through the fp32 artifact's classifier:
every variant has the same input size and resize policy), PyTorch runs once on them (parity's
`run_torch`, the textbook normalisation), and each variant is compared with it: top-1 agreement,
top-5 agreement (same set of five classes), and top-1/top-5 accuracy on the images that carry a
label (none: only agreement is judged).

Calibration images are never evaluation images: with no `--calibration-images` folder, or the
same folder as `--eval-images`, the evaluation set is split deterministically (every third image
by file name goes to calibration).
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from flows.reference import ReferenceImage

CALIBRATION_EVERY = 3  # of an evaluation folder split in two: every third image calibrates


@dataclass(frozen=True)
class ImageSplit:
    evaluation: list[ReferenceImage]
    calibration: list[Path]
    how: str  # one line for the report: where each set came from


def split_images(evaluation: Sequence[ReferenceImage], eval_dir: Path, calibration_dir: Path | None,
                 calibration_count: int) -> ImageSplit:
    """Evaluation and calibration images, disjoint (by content, not only by name)."""
    from flows.stages.variants import image_files

    same = calibration_dir is None or Path(calibration_dir).resolve() == Path(eval_dir).resolve()
    if same:
        ordered = sorted(evaluation, key=lambda ref: ref.name)
        calibration = [ref for index, ref in enumerate(ordered) if index % CALIBRATION_EVERY == 0][:calibration_count]
        taken = {ref.path for ref in calibration}
        kept = [ref for ref in evaluation if ref.path not in taken]
        return ImageSplit(kept, [ref.path for ref in calibration],
                          f"{eval_dir} split by file name: {len(calibration)} images calibrate, {len(kept)} evaluate")
    eval_hashes = {digest(ref.path) for ref in evaluation}
    candidates = image_files(calibration_dir)
    calibration = [path for path in candidates if digest(path) not in eval_hashes]
    dropped = len(candidates) - len(calibration)
    note = f" ({dropped} also in the evaluation set left out)" if dropped else ""
    return ImageSplit(list(evaluation), calibration[:calibration_count],
                      f"evaluation {eval_dir} ({len(evaluation)} images), calibration {calibration_dir} "
                      f"({min(len(calibration), calibration_count)} images{note})")


def digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@dataclass
class Agreement:
    images: int
    top1_agreement: float  # the variant's top-1 == PyTorch's top-1
    top5_agreement: float  # same set of five classes as PyTorch
    labelled: int
    correct: int
    top5_correct: int
    disagreements: list[dict] = field(default_factory=list)  # file, torch, variant (top-1 class)

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.labelled if self.labelled else None

    @property
    def top5_accuracy(self) -> float | None:
        return self.top5_correct / self.labelled if self.labelled else None

    def to_dict(self) -> dict:
        return {**asdict(self), "accuracy": self.accuracy, "top5_accuracy": self.top5_accuracy}


@dataclass(frozen=True)
class TorchReference:
    """PyTorch's answers on the decoded evaluation images."""

    images: np.ndarray  # uint8 NHWC, what every variant is fed
    top1: np.ndarray
    top5: np.ndarray
    expected: list[int | None]
    names: list[str]


def torch_reference(loaded, classifier, evaluation: Sequence[ReferenceImage], batch_size: int = 16) -> TorchReference:
    from flows.stages.parity import run_torch

    if not evaluation:
        raise ValueError("evaluation needs at least one image")
    images = np.stack([classifier.load_input(ref.path) for ref in evaluation])
    probabilities = np.concatenate([run_torch(loaded, images[start:start + batch_size])[1]
                                    for start in range(0, len(images), batch_size)])
    return TorchReference(images, probabilities.argmax(axis=1), np.argsort(-probabilities, axis=1)[:, :5],
                          [ref.expected_class for ref in evaluation], [ref.name for ref in evaluation])


def measure_agreement(classifier, reference: TorchReference, batch_size: int = 16) -> Agreement:
    """Compare `classifier` (any variant) with PyTorch on the decoded evaluation images."""
    probabilities = np.concatenate([classifier.predict(reference.images[start:start + batch_size])
                                    for start in range(0, len(reference.images), batch_size)])
    top1 = probabilities.argmax(axis=1)
    top5 = np.argsort(-probabilities, axis=1)[:, :5]
    same1 = top1 == reference.top1
    same5 = [set(a) == set(b) for a, b in zip(top5, reference.top5)]
    labelled = [i for i, expected in enumerate(reference.expected) if expected is not None]
    return Agreement(
        images=len(top1),
        top1_agreement=float(same1.mean()),
        top5_agreement=float(np.mean(same5)),
        labelled=len(labelled),
        correct=sum(int(top1[i] == reference.expected[i]) for i in labelled),
        top5_correct=sum(int(reference.expected[i] in top5[i]) for i in labelled),
        disagreements=[{"file": reference.names[i], "torch": int(reference.top1[i]), "variant": int(top1[i])}
                       for i in np.flatnonzero(~same1)],
    )
