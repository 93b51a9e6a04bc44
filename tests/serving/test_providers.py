"""The GPU providers a server worker asks ONNX Runtime for, computed on a CPU machine: the options
for a given configuration and artifact (serving/providers.py), and the flags that set them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from serving.artifact import file_sha256, read_metadata
from serving.config import ConfigError, load_config
from serving.providers import CPU, CUDA, TENSORRT, GpuSettings, execution_providers, trt_engine_dir, trt_timing_dir
from serving.runtime import Classifier

ORT = "1.26.0"


def providers_for(argv: list[str], artifact: Path, environ: dict | None = None) -> list:
    config = load_config(["--model", str(artifact), "--no-auth", "--device", "cuda", *argv], environ=environ or {})
    config = config.resolved("cuda")
    return execution_providers("cuda", config.gpu_settings(), device_id=1, input_name="images",
                               input_size=read_metadata(artifact).input_size, model_sha256=file_sha256(artifact),
                               ort_version=ORT)


def test_tensorrt_fp16_engines_one_profile_for_the_batch_axis_and_persistent_caches(default_artifact, tmp_path):
    sha = file_sha256(default_artifact)
    size = read_metadata(default_artifact).input_size
    providers = providers_for(["--tensorrt", "--trt-fp16", "--max-batch-size", "16"], default_artifact,
                              {"ONNXSHIP_TRT_CACHE_DIR": str(tmp_path / "trt")})
    assert [p[0] if isinstance(p, tuple) else p for p in providers] == [TENSORRT, CUDA, CPU]
    engines = tmp_path / "trt" / f"{sha[:16]}-ort{ORT}-fp16-b1-16"
    assert providers[0][1] == {
        "device_id": "1",
        "trt_fp16_enable": "1",
        "trt_engine_cache_enable": "1",
        "trt_engine_cache_path": str(engines),
        "trt_timing_cache_enable": "1",
        "trt_timing_cache_path": str(tmp_path / "trt" / f"timing-ort{ORT}"),
        "trt_profile_min_shapes": f"images:1x{size}x{size}x3",
        "trt_profile_opt_shapes": f"images:16x{size}x{size}x3",
        "trt_profile_max_shapes": f"images:16x{size}x{size}x3",
    }
    assert providers[1][1] == {"device_id": "1", "cudnn_conv_algo_search": "HEURISTIC",
                               "do_copy_in_default_stream": "1"}


def test_gpu_defaults_without_tensorrt_and_cpu(default_artifact, tmp_path):
    providers = providers_for([], default_artifact)
    assert providers == [(CUDA, {"device_id": "1", "cudnn_conv_algo_search": "HEURISTIC",
                                 "do_copy_in_default_stream": "1"}), CPU]
    exhaustive = providers_for(["--cudnn-conv-algo-search", "EXHAUSTIVE"], default_artifact)
    assert exhaustive[0][1]["cudnn_conv_algo_search"] == "EXHAUSTIVE"
    # the GPU default batch size is the profile's end when --max-batch-size is not given
    trt = providers_for(["--tensorrt"], default_artifact, {"ONNXSHIP_TRT_CACHE": str(tmp_path)})
    assert trt[0][1]["trt_profile_max_shapes"].startswith("images:32x") and trt[0][1]["trt_fp16_enable"] == "0"
    assert trt[0][1]["trt_engine_cache_path"].startswith(str(tmp_path))
    assert execution_providers("cpu", GpuSettings(tensorrt=True), device_id=0, input_name="images", input_size=224,
                               model_sha256="0" * 64, ort_version=ORT) == [CPU]


def test_an_engine_is_never_reused_for_another_model_precision_profile_or_runtime(tmp_path):
    base = GpuSettings(tensorrt=True, trt_cache_dir=str(tmp_path), max_batch_size=32)
    folders = {
        trt_engine_dir(base, "a" * 64, ORT),
        trt_engine_dir(base, "b" * 64, ORT),
        trt_engine_dir(GpuSettings(tensorrt=True, trt_fp16=True, trt_cache_dir=str(tmp_path)), "a" * 64, ORT),
        trt_engine_dir(GpuSettings(tensorrt=True, trt_cache_dir=str(tmp_path), max_batch_size=8), "a" * 64, ORT),
        trt_engine_dir(base, "a" * 64, "1.27.0"),
    }
    assert len(folders) == 5 and all(folder.parent == tmp_path for folder in folders)
    # the timing cache (per layer, not per model) is shared by every model of one runtime
    assert trt_timing_dir(base, ORT) == trt_timing_dir(GpuSettings(trt_cache_dir=str(tmp_path)), ORT)


def test_gpu_flags_and_their_errors():
    config = load_config(["--model", "m.onnx", "--no-auth"], environ={})
    assert config.trt_cache_dir == str(Path.home() / ".cache" / "onnxship" / "tensorrt")
    config = load_config(["--model", "m.onnx", "--no-auth", "--trt-cache-dir", "/flag"],
                         environ={"ONNXSHIP_TRT_CACHE_DIR": "/env", "ONNXSHIP_TENSORRT": "1", "ONNXSHIP_TRT_FP16": "1"})
    assert (config.trt_cache_dir, config.tensorrt, config.trt_fp16) == ("/flag", True, True)
    with pytest.raises(ConfigError, match="--trt-fp16.*--tensorrt"):
        load_config(["--model", "m.onnx", "--no-auth", "--trt-fp16"], environ={})
    with pytest.raises(ConfigError, match="ONNXSHIP_CUDNN_CONV_ALGO_SEARCH"):
        load_config(["--model", "m.onnx", "--no-auth"], environ={"ONNXSHIP_CUDNN_CONV_ALGO_SEARCH": "fastest"})


def test_a_batch_beyond_the_profile_runs_in_pieces_with_the_same_answers(default_artifact):
    classifier = Classifier(default_artifact, device="cpu", intra_op_threads=1)
    size = classifier.metadata.input_size
    batch = np.random.default_rng(0).integers(0, 256, (5, size, size, 3), dtype=np.uint8)
    whole = classifier.run(batch)
    classifier.max_batch = 2  # what a TensorRT profile ending at batch 2 sets
    pieces = classifier.run(batch)
    for a, b in zip(whole, pieces):
        assert a.shape == b.shape == (5, classifier.metadata.num_classes)
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
