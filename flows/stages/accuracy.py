"""Top-1 accuracy of an artifact on labelled images, through ONNX Runtime (serving.runtime.Classifier),
i.e. exactly the decode -> resize -> graph path the server takes. Images without an expected class
are skipped.

Measure the resize policies of an architecture on your own labelled images (nothing is written
into the repository; the artifacts go to a temporary directory):

    python -m flows.stages.accuracy --images-dir ../shared/data/imagenet-sample-dev
    python -m flows.stages.accuracy --images-dir DIR --arch resnet18 --weights W.pth --policies center_crop
    python -m flows.stages.accuracy --images-dir DIR --model models/model.onnx
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from flows.reference import ReferenceImage, ReferenceSetError, load_reference_set


@dataclass
class AccuracyResult:
    correct: int
    total: int
    top1: float  # correct / total (0.0 when total is 0)
    per_image: list[dict] = field(default_factory=list)  # file, expected, predicted, confidence, correct
    top5_correct: int = 0

    @property
    def top5(self) -> float:
        return self.top5_correct / self.total if self.total else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "top5": self.top5}

    def metrics(self, prefix: str = "reference") -> dict[str, float]:
        return {f"{prefix}/top1_accuracy": self.top1, f"{prefix}/top5_accuracy": self.top5,
                f"{prefix}/correct_count": float(self.correct), f"{prefix}/labelled_count": float(self.total)}


def open_classifier(model_path: str | Path, like=None):
    """A CPU session on `model_path`; `like`: a Classifier whose intra-op thread count it takes, so that
    two artifacts measured side by side (candidate and champion, fp32 and a variant) run alike."""
    from serving.runtime import Classifier

    return Classifier(model_path, device="cpu", intra_op_threads=like.intra_op_threads if like is not None else None)


def measure_accuracy(classifier_or_path, references: Sequence[ReferenceImage], batch_size: int = 16) -> AccuracyResult:
    """Top-1 (and top-5) of the artifact on the labelled `references`."""
    classifier = (
        open_classifier(classifier_or_path) if isinstance(classifier_or_path, (str, Path)) else classifier_or_path
    )
    labelled = [r for r in references if r.expected_class is not None]
    per_image: list[dict] = []
    correct = top5_correct = 0
    for start in range(0, len(labelled), batch_size):
        chunk = labelled[start : start + batch_size]
        batch = np.stack([classifier.load_input(r.path) for r in chunk])
        probabilities = np.asarray(classifier.predict(batch))
        for reference, row in zip(chunk, probabilities):
            predicted = int(row.argmax())
            top5 = [int(i) for i in np.argsort(-row)[:5]]
            hit = predicted == reference.expected_class
            correct += hit
            top5_correct += reference.expected_class in top5
            per_image.append(
                {
                    "file": reference.name,
                    "expected": reference.expected_class,
                    "predicted": predicted,
                    "confidence": float(row[predicted]),
                    "correct": hit,
                }
            )
    total = len(labelled)
    return AccuracyResult(correct, total, correct / total if total else 0.0, per_image, top5_correct)


def compare_policies(
    arch: str, weights: str | Path | None, references: Sequence[ReferenceImage], policies: Sequence[str]
) -> dict[str, AccuracyResult]:
    """Export + simplify `arch` once per resize policy (temporary files), measure each through ONNX Runtime."""
    from flows.stages.export import export_onnx
    from flows.model.zoo import load_model
    from flows.stages.simplify import simplify_onnx

    loaded = load_model(arch, weights)
    results = {}
    with tempfile.TemporaryDirectory(prefix="onnxship-accuracy-") as scratch:
        for policy in policies:
            path = Path(scratch) / f"{policy}.onnx"
            export_onnx(loaded, path, resize_policy=policy)
            simplify_onnx(path)
            results[policy] = measure_accuracy(path, references)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    from serving.images import RESIZE_POLICIES

    parser = argparse.ArgumentParser(prog="python -m flows.stages.accuracy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--images-dir", required=True, type=Path, help="directory with images + manifest.csv")
    parser.add_argument("--manifest", type=Path, help="CSV file,class_index (default: <images-dir>/manifest.csv)")
    parser.add_argument("--model", type=Path, help="measure this artifact instead of exporting --arch")
    parser.add_argument("--arch", default="efficientnet_lite0")
    parser.add_argument("--weights", type=Path)
    parser.add_argument("--policies", nargs="+", choices=RESIZE_POLICIES, default=list(RESIZE_POLICIES))
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    try:
        references = load_reference_set(args.images_dir, args.manifest)
        started = time.perf_counter()
        if args.model is not None:
            results = {"artifact": measure_accuracy(args.model, references)}
        else:
            results = compare_policies(args.arch, args.weights, references, args.policies)
    except (ReferenceSetError, ValueError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({name: result.to_dict() for name, result in results.items()}, indent=2))
        return 0
    what = str(args.model) if args.model is not None else args.arch
    print(f"{what} on {args.images_dir} ({time.perf_counter() - started:.1f} s, ONNX Runtime CPU)")
    for name, result in results.items():
        print(f"  {name:12s} top-1 {result.correct}/{result.total} = {result.top1:.1%}   top-5 {result.top5:.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
