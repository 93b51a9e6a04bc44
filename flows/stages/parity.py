"""Parity: does the ONNX artifact (ONNX Runtime, CPU) compute what the PyTorch model computes?

Both sides see the same pixels: each reference image is decoded and resized once by
`serving.images.load_image` with the artifact's input size and resize policy. PyTorch gets them
normalised in numpy (`reference_normalise`, float32, the textbook formula); ONNX Runtime gets the
raw uint8 batch and normalises inside the graph. The artifact is run at every batch size in
`batch_sizes` (the last chunk may be smaller), so a broken dynamic batch axis shows up too.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np

from serving.runtime import Classifier
from flows.model.zoo import LoadedModel
from flows.reference import ReferenceImage


@dataclass(frozen=True)
class ParityTolerances:
    min_top1_agreement: float = 1.0
    max_prob_diff: float = 1e-4


@dataclass
class ParityResult:
    max_abs_prob_diff: float
    max_abs_logit_diff: float
    top1_agreement: float  # fraction of (image, batch size) runs whose top-1 class matches PyTorch
    top5_agreement: float  # fraction whose top-5 classes (as a set) match PyTorch's
    images: int
    batch_sizes: tuple[int, ...]
    passed: bool
    failures: list[str] = field(default_factory=list)
    tolerances: ParityTolerances = field(default_factory=ParityTolerances)
    # per image: file, expected, torch top-1 (+confidence), onnx top-1 (+confidence), max prob diff
    per_image: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["batch_sizes"] = list(self.batch_sizes)
        return data

    def metrics(self) -> dict[str, float]:
        return {"parity/top1_agreement": self.top1_agreement, "parity/top5_agreement": self.top5_agreement,
                "parity/max_abs_prob_diff": self.max_abs_prob_diff, "parity/max_abs_logit_diff": self.max_abs_logit_diff,
                "parity/images_count": float(self.images)}

    def raise_for_failure(self) -> None:
        if not self.passed:
            raise ParityError(self)

    def summary(self) -> str:
        return (
            f"{self.images} images, batch sizes {', '.join(map(str, self.batch_sizes))}: "
            f"top-1 agreement {self.top1_agreement:.1%}, top-5 agreement {self.top5_agreement:.1%}, "
            f"max |prob diff| {self.max_abs_prob_diff:.2e}, max |logit diff| {self.max_abs_logit_diff:.2e}"
        )


class ParityError(AssertionError):
    """The artifact disagrees with the PyTorch model beyond the tolerances."""

    def __init__(self, result: ParityResult):
        self.result = result
        super().__init__("parity check failed: " + "; ".join(result.failures))


def reference_normalise(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """uint8 NHWC RGB -> float32 NCHW, (x / 255 - mean) / std: the model's own preprocessing."""
    x = images.astype(np.float32) / np.float32(255.0)
    x = (x - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def run_torch(loaded: LoadedModel, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    import torch

    x = torch.from_numpy(reference_normalise(images, loaded.spec.mean, loaded.spec.std))
    with torch.no_grad():
        logits = loaded.module.eval()(x).float()
        probabilities = torch.softmax(logits, dim=1)
    return logits.numpy(), probabilities.numpy()


def check_parity(
    loaded: LoadedModel,
    classifier: Classifier,
    references: Sequence[ReferenceImage],
    batch_sizes: Sequence[int] = (1, 4),
    tolerances: ParityTolerances = ParityTolerances(),
) -> ParityResult:
    """Compare `loaded` (PyTorch) with `classifier` (the artifact in the server's own ONNX Runtime
    session and preprocessing) on `references`, at every batch size."""
    if not references:
        raise ValueError("parity needs at least one reference image")
    images = np.stack([classifier.load_input(r.path) for r in references])
    torch_logits, torch_probs = run_torch(loaded, images)
    torch_top1 = torch_probs.argmax(axis=1)
    torch_top5 = np.argsort(-torch_probs, axis=1)[:, :5]

    prob_diff = logit_diff = 0.0
    top1_hits = top5_hits = runs = 0
    disagreements: list[str] = []
    per_image_diff = np.zeros(len(references))
    onnx_probs_first = None
    for batch_size in batch_sizes:
        logits_parts, probs_parts = [], []
        for start in range(0, len(images), batch_size):
            logits, probs = classifier.run(images[start : start + batch_size])
            logits_parts.append(logits)
            probs_parts.append(probs)
        onnx_logits, onnx_probs = np.concatenate(logits_parts), np.concatenate(probs_parts)
        if onnx_probs_first is None:
            onnx_probs_first = onnx_probs
        diff = np.abs(onnx_probs - torch_probs).max(axis=1)
        per_image_diff = np.maximum(per_image_diff, diff)
        prob_diff = max(prob_diff, float(diff.max()))
        logit_diff = max(logit_diff, float(np.abs(onnx_logits - torch_logits).max()))
        onnx_top1 = onnx_probs.argmax(axis=1)
        onnx_top5 = np.argsort(-onnx_probs, axis=1)[:, :5]
        for index, reference in enumerate(references):
            runs += 1
            if onnx_top1[index] == torch_top1[index]:
                top1_hits += 1
            else:
                disagreements.append(
                    f"{reference.name} at batch size {batch_size}: ONNX top-1 {onnx_top1[index]} "
                    f"!= PyTorch top-1 {torch_top1[index]}"
                )
            if set(onnx_top5[index]) == set(torch_top5[index]):
                top5_hits += 1

    top1_agreement = top1_hits / runs
    failures: list[str] = []
    if top1_agreement < tolerances.min_top1_agreement:
        more = f"; ... {len(disagreements) - 3} more" if len(disagreements) > 3 else ""
        failures.append(
            f"top-1 agreement {top1_agreement:.1%} < required {tolerances.min_top1_agreement:.1%} "
            f"({'; '.join(disagreements[:3])}{more})"
        )
    if prob_diff > tolerances.max_prob_diff:
        worst = references[int(per_image_diff.argmax())].name
        failures.append(
            f"max |probability diff| {prob_diff:.2e} > tolerance {tolerances.max_prob_diff:.0e} (worst image: {worst})"
        )
    per_image = [
        {
            "file": reference.name,
            "expected": reference.expected_class,
            "torch_top1": int(torch_top1[index]),
            "torch_confidence": float(torch_probs[index, torch_top1[index]]),
            "onnx_top1": int(onnx_probs_first[index].argmax()),
            "onnx_confidence": float(onnx_probs_first[index].max()),
            "max_prob_diff": float(per_image_diff[index]),
        }
        for index, reference in enumerate(references)
    ]
    return ParityResult(
        max_abs_prob_diff=prob_diff,
        max_abs_logit_diff=logit_diff,
        top1_agreement=top1_agreement,
        top5_agreement=top5_hits / runs,
        images=len(references),
        batch_sizes=tuple(batch_sizes),
        passed=not failures,
        failures=failures,
        tolerances=tolerances,
        per_image=per_image,
    )
