"""A "null" artifact: the exact contract of a real onnxship artifact, computing almost nothing.

Input `images` uint8 [N, H, W, 3], outputs `logits` and `probabilities` float32 [N, classes], and
the same metadata_props (labels, input size, resize policy ...), so `python -m serving` loads and
serves it like the real model. The graph reads one pixel per image and multiplies it by a
3 x classes matrix: a few thousand multiply-adds per image, so what a server spends around the
model (HTTP, decoding, hand-off between processes) is all that is left to measure. On a GPU
replica that surrounding work decides the throughput; here it can be measured on a CPU.

    python -m benchmarks.null_artifact models/model.onnx /tmp/null.onnx

Needs the `onnx` package (a pipeline/dev dependency; benchmarks never ship in the server image).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def build_null_artifact(source: str | Path, target: str | Path, work: int = 0) -> Path:
    """Write the null twin of the artifact `source` to `target` and return `target`.

    `work` > 0 makes it slow on purpose, like a big model: every call also squares a work x work
    matrix that depends on the input (so ONNX Runtime cannot fold it away): 2 x work^3 FLOP per
    call whatever the batch size (work=1024: a few ms to tens of ms on a CPU). The overload and
    drain tests use it to hold requests in flight for a predictable while."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    real = onnx.load(str(source), load_external_data=False)
    props = {p.key: p.value for p in real.metadata_props}
    inputs = {i.name: i for i in real.graph.input}
    outputs = {o.name: o for o in real.graph.output}
    if "images" not in inputs or not {"logits", "probabilities"} <= set(outputs):
        raise ValueError(f"{source}: not an onnxship artifact (inputs {sorted(inputs)}, outputs {sorted(outputs)})")
    classes = outputs["logits"].type.tensor_type.shape.dim[1].dim_value
    size = int(props.get("input_size", 224))

    weights = np.random.default_rng(0).standard_normal((3, classes)).astype(np.float32) / 255.0
    nodes = [
        # the top-left pixel of every image: [N, 1, 1, 3] -> [N, 3]
        helper.make_node("Slice", ["images", "starts", "ends", "axes"], ["corner"]),
        helper.make_node("Reshape", ["corner", "flat_shape"], ["pixel_u8"]),
        helper.make_node("Cast", ["pixel_u8"], ["pixel"], to=TensorProto.FLOAT),
        helper.make_node("MatMul", ["pixel", "weights"], ["raw_logits"]),
    ]
    if work > 0:  # logits + 0 * sum(M @ M), M = ones(work, work) * mean(pixel): input-dependent, never folded
        nodes += [
            helper.make_node("ReduceMean", ["pixel"], ["level"], keepdims=0),
            helper.make_node("ConstantOfShape", ["work_shape"], ["ones"],
                             value=numpy_helper.from_array(np.array([1.0], np.float32))),
            helper.make_node("Mul", ["ones", "level"], ["matrix"]),
            helper.make_node("MatMul", ["matrix", "matrix"], ["squared"]),
            helper.make_node("ReduceSum", ["squared"], ["total"], keepdims=0),
            helper.make_node("Mul", ["total", "zero"], ["nothing"]),
            helper.make_node("Add", ["raw_logits", "nothing"], ["logits"]),
        ]
    else:
        nodes.append(helper.make_node("Identity", ["raw_logits"], ["logits"]))
    nodes.append(helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1))
    initializers = [
        numpy_helper.from_array(np.array([0, 0], np.int64), "starts"),
        numpy_helper.from_array(np.array([1, 1], np.int64), "ends"),
        numpy_helper.from_array(np.array([1, 2], np.int64), "axes"),
        numpy_helper.from_array(np.array([-1, 3], np.int64), "flat_shape"),
        numpy_helper.from_array(weights, "weights"),
    ]
    if work > 0:
        initializers += [numpy_helper.from_array(np.array([work, work], np.int64), "work_shape"),
                         numpy_helper.from_array(np.array(0.0, np.float32), "zero")]
    graph = helper.make_graph(
        nodes,
        "onnxship-null",
        [helper.make_tensor_value_info("images", TensorProto.UINT8, ["batch", size, size, 3])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes]),
         helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", classes])],
        initializers,
    )
    opset = next((o.version for o in real.opset_import if o.domain in ("", "ai.onnx")), 17)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="onnxship-null")
    model.ir_version = real.ir_version
    for key, value in {**props, "arch": f"null({props.get('arch', '?')})"}.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(model)
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(target))
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the null twin of an onnxship artifact.")
    parser.add_argument("source", type=Path)
    parser.add_argument("target", type=Path)
    parser.add_argument("--work", type=int, default=0, help="make every call cost 2 x work^3 FLOP (0: none)")
    args = parser.parse_args(argv)
    print(build_null_artifact(args.source, args.target, args.work))
    return 0


if __name__ == "__main__":
    sys.exit(main())
