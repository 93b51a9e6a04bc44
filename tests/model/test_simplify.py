"""onnxsim on the real model, and the fallback: keep the unsimplified graph and say why."""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import onnx.helper
import onnxruntime as ort

from flows.stages.simplify import simplify_onnx
from serving.artifact import ArtifactMetadata, read_metadata


def with_custom_op(source, target):
    """The real model with a user's custom operator on the probabilities (com.example:Temperature),
    as a model exported with a custom-op library looks; ONNX Runtime has no kernel for it, so
    onnxsim's constant folding and check cannot run it."""
    model = onnx.load(str(source))
    output = model.graph.output[1].name
    for node in model.graph.node:
        node.output[:] = ["before_custom_op" if name == output else name for name in node.output]
    model.graph.node.append(onnx.helper.make_node("Temperature", ["before_custom_op"], [output], domain="com.example"))
    model.opset_import.append(onnx.helper.make_opsetid("com.example", 1))
    onnx.save(model, str(target))
    return len(model.graph.node)


def test_simplify_shrinks_the_graph_and_keeps_metadata(default_artifact):
    # default_artifact was exported and simplified by the fixture (tests/conftest.py)
    props = {p.key: p.value for p in onnx.load(str(default_artifact)).metadata_props}
    before, after = (int(v) for v in props["simplified_by"].split(": ")[1].split(" nodes")[0].split(" -> "))
    assert after < before / 2
    assert not any(key.startswith("onnxsim.") for key in props)  # onnxsim's provenance dump is dropped
    assert read_metadata(default_artifact).arch == "efficientnet_lite0"


def test_custom_op_makes_onnxsim_fail_and_the_graph_is_kept(default_artifact, tmp_path):
    source = tmp_path / "custom.onnx"
    nodes = with_custom_op(default_artifact, source)
    result = simplify_onnx(source, tmp_path / "out.onnx")
    assert not result.simplified
    assert "onnxsim failed" in result.error and "Temperature" in result.error
    assert result.nodes_before == result.nodes_after == nodes
    kept = onnx.load(str(result.path))
    assert [n.op_type for n in kept.graph.node][-1] == "Temperature"
    props = {p.key: p.value for p in kept.metadata_props}
    assert props["simplify_error"] == result.error
    assert ArtifactMetadata.from_props(props).arch == "efficientnet_lite0"  # the metadata survived
    assert result.to_dict()["error"] == result.error


def test_timeout_keeps_the_unsimplified_graph_in_place(default_artifact, tmp_path):
    path = tmp_path / "model.onnx"
    shutil.copy(default_artifact, path)
    result = simplify_onnx(path, timeout_s=0.01)
    assert not result.simplified and "did not finish within 0.01 s" in result.error
    assert result.path == path and result.nodes_after == result.nodes_before
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])  # still a working artifact
    _, probabilities = session.run(None, {"images": np.zeros((2, 224, 224, 3), np.uint8)})
    assert probabilities.shape == (2, 1000)
    assert read_metadata(path).resize_policy == "center_crop"
