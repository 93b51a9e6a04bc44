#!/usr/bin/env python
"""Convert a PyTorch image classifier to a validated onnxship ONNX artifact.

    python scripts/convert_to_onnx.py --output models/model.onnx --test-image data/images/coffee.png
    python scripts/convert_to_onnx.py --arch resnet18 --weights pytorch_model_weights.pth

Exports with the preprocessing folded into the graph (uint8 NHWC input), simplifies with onnxsim
(keeping the unsimplified graph if that fails), then checks parity between PyTorch and ONNX
Runtime on the test image and the repository's reference photos (data/images). Exit status:
0 success, 1 parity failure or export failure, 2 bad input (one line on stderr says which).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

os.environ.setdefault("PYTHONWARNINGS", "ignore")

BAD_INPUT, FAILED = 2, 1
DEFAULT_OUTPUT = Path("models/model.onnx")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from flows.stages.export import DEFAULT_OPSET
    from flows.model.zoo import DEFAULT_ARCH
    from serving.images import RESIZE_POLICIES

    parser = argparse.ArgumentParser(
        prog="convert_to_onnx.py",
        description="Export a PyTorch classifier to an onnxship ONNX artifact and check parity.",
    )
    parser.add_argument(
        "--arch",
        default=DEFAULT_ARCH,
        help="efficientnet_lite0 (default; bundled pretrained weights), resnet18, resnet34, resnet50, "
        "or package.module:callable returning your own nn.Module",
    )
    parser.add_argument("--weights", type=Path, help="PyTorch state dict (.pth) for --arch")
    parser.add_argument(
        "--random-init",
        action="store_true",
        help="use a seeded random initialisation (parity testing of architectures without weights)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        help=f"where to write the artifact (default: {DEFAULT_OUTPUT}, created if missing; "
        "an explicit path's directory must exist)",
    )
    parser.add_argument("--test-image", type=Path, help="image to classify with PyTorch and ONNX Runtime")
    parser.add_argument(
        "--dynamic-axes",
        action="store_true",
        default=True,
        help="dynamic batch dimension (always on; kept for compatibility with the seed's script)",
    )
    parser.add_argument(
        "--resize-policy",
        choices=RESIZE_POLICIES,
        help="how images are fitted to the input size (default: the architecture's measured best)",
    )
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    parser.add_argument("--no-simplify", action="store_true", help="skip onnxsim")
    parser.add_argument(
        "--reference-images",
        type=Path,
        default=None,
        help="directory with manifest.csv of parity images (default: data/images; 'none' to skip)",
    )
    parser.add_argument("--max-prob-diff", type=float, default=1e-4, help="parity tolerance (default 1e-4)")
    return parser.parse_args(argv)


def fail(message: str, status: int = BAD_INPUT) -> int:
    print(f"error: {message}", file=sys.stderr)
    return status


def test_image_error(path: Path, error: Exception) -> str:
    message = str(error)
    prefix = "" if message.startswith(str(path)) else f"{path}: "
    return f"--test-image {prefix}{message}"


def describe_prediction(probabilities, labels) -> str:
    index = int(probabilities.argmax())
    return f"{index} {labels[index]} ({float(probabilities[index]):.2%})"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)


    from flows.stages.export import DEFAULT_OPSET, MIN_OPSET, ExportError, check_opset, check_output_path, export_onnx
    from flows.model.zoo import ARCHITECTURES, ModelLoadError, load_model
    from flows.stages.parity import ParityTolerances, check_parity, run_torch
    from flows.reference import ReferenceImage, ReferenceSetError, load_reference_set
    from flows.stages.simplify import simplify_onnx
    from serving.runtime import Classifier
    from serving.images import ImageError, load_image

    if args.output is None:
        args.output = DEFAULT_OUTPUT
        DEFAULT_OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    try:
        output = check_output_path(args.output)
    except ExportError as error:
        return fail(f"--output: {error}")
    if not MIN_OPSET <= args.opset <= DEFAULT_OPSET + 10:  # the exact upper bound needs torch: checked below
        return fail(f"--opset {args.opset}: not supported; use {MIN_OPSET}..{DEFAULT_OPSET} (default {DEFAULT_OPSET})")
    # Cheap checks first (no torch import yet): a typo fails in a fraction of a second.
    known = ARCHITECTURES.get(args.arch)
    test_pixels = None
    if known is not None and args.test_image is not None:
        policy = args.resize_policy or known.spec.default_resize_policy
        try:
            test_pixels = load_image(args.test_image, known.spec.input_size, policy)
        except ImageError as error:
            return fail(test_image_error(args.test_image, error))
    try:
        loaded = load_model(args.arch, args.weights, random_init=args.random_init)
    except ModelLoadError as error:
        return fail(str(error))
    try:
        check_opset(args.opset)
    except ExportError as error:
        return fail(f"--opset: {error}")
    policy = args.resize_policy or loaded.spec.default_resize_policy
    size = loaded.spec.input_size
    if test_pixels is None and args.test_image is not None:
        try:
            test_pixels = load_image(args.test_image, size, policy)
        except ImageError as error:
            return fail(test_image_error(args.test_image, error))

    references: list[ReferenceImage] = []
    if args.reference_images is None or str(args.reference_images).lower() != "none":
        try:
            references = load_reference_set(args.reference_images or REPO_ROOT / "data" / "images")
        except ReferenceSetError as error:
            return fail(f"--reference-images: {error}")
    if args.test_image is not None and all(r.path.resolve() != args.test_image.resolve() for r in references):
        references.insert(0, ReferenceImage(path=args.test_image, expected_class=None, label=""))

    print(f"model: {loaded.spec.arch}, weights: {loaded.weights_source} (sha256 {loaded.weights_sha256[:16]}...)")
    try:
        exported = export_onnx(loaded, output, resize_policy=policy, opset=args.opset)
    except ExportError as error:
        return fail(str(error), FAILED)
    print(
        f"exported {output} in {exported.seconds:.1f} s: {exported.node_count} nodes, opset {args.opset}, "
        f"input images uint8 [batch, {size}, {size}, 3] NHWC, resize policy {policy}"
    )
    if not args.no_simplify:
        simplified = simplify_onnx(output)
        if simplified.simplified:
            print(
                f"simplified with onnxsim in {simplified.seconds:.1f} s: "
                f"{simplified.nodes_before} -> {simplified.nodes_after} nodes"
            )
        else:
            print(f"warning: simplification failed, kept the unsimplified graph: {simplified.error}")

    classifier = Classifier(output, device="cpu")  # the server's own session, for the test image and parity
    if test_pixels is not None:
        batch = test_pixels[None]
        _, torch_probs = run_torch(loaded, batch)
        onnx_probs = classifier.predict(batch)
        labels = classifier.labels
        print(f"test image {args.test_image}:")
        print(f"  PyTorch       {describe_prediction(torch_probs[0], labels)}")
        print(f"  ONNX Runtime  {describe_prediction(onnx_probs[0], labels)}")

    if references:
        tolerances = ParityTolerances(max_prob_diff=args.max_prob_diff)
        result = check_parity(loaded, classifier, references, batch_sizes=(1, 4), tolerances=tolerances)
        print(f"parity: {result.summary()}")
        if not result.passed:
            return fail("parity check failed: " + "; ".join(result.failures), FAILED)
    print(f"artifact ready: {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
