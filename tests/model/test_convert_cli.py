"""scripts/convert_to_onnx.py as a user runs it: real subprocesses, real files.

All runs start together in one module fixture (each pays the torch import once; running them side by
side keeps this file's wall time near the slowest run) and every process is waited for or killed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flows.model.zoo import bundled_efficientnet_lite0_weights
from flows.model.resnet import resnet18
from serving.artifact import file_sha256, read_metadata

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "scripts" / "convert_to_onnx.py"
IMAGES = REPO_ROOT / "data" / "images"
RUN_TIMEOUT_S = 300


def torchvision_style_resnet18(path: Path) -> Path:
    """What the seed's users bring: a torchvision-layout ResNet-18 state dict (random values here)."""
    torch.manual_seed(3)
    model = resnet18()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    torch.save(model.state_dict(), path)
    return path


def read_only_directory(scratch: Path) -> Path:
    if os.geteuid() != 0:
        directory = scratch / "read-only"
        directory.mkdir()
        directory.chmod(0o555)
        return directory
    try:
        Path("/sys/.onnxship-write-probe").touch()
    except OSError:
        return Path("/sys")  # root cannot create files in sysfs
    Path("/sys/.onnxship-write-probe").unlink()
    pytest.skip("running as root and /sys is writable: no read-only directory to test with")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    scratch = tmp_path_factory.mktemp("convert-cli")
    weights = torchvision_style_resnet18(scratch / "pytorch_model_weights.pth")
    state = torch.load(weights, weights_only=True)
    state.pop("layer2.1.conv2.weight")
    state["classifier.weight"] = torch.zeros(2)
    torch.save(state, scratch / "wrong_keys.pth")
    (scratch / "garbage.pth").write_text("not a checkpoint\n")
    torch.save(torch.nn.Linear(2, 2), scratch / "module.pth")  # the whole model, not its state dict
    (scratch / "empty.jpg").write_bytes(b"")
    (scratch / "notes.jpg").write_text("these are notes, not a JPEG\n")
    photo = (IMAGES / "rocket.jpg").read_bytes()
    (scratch / "truncated.jpg").write_bytes(photo[: len(photo) // 3])
    read_only = read_only_directory(scratch)
    out = scratch / "out"
    out.mkdir()
    effnet_cwd = scratch / "effnet"
    effnet_cwd.mkdir()

    cases = {
        "effnet": (["--test-image", str(IMAGES / "coffee.png")], effnet_cwd),  # default --output
        "resnet18": (
            ["--arch", "resnet18", "--weights", str(weights), "--test-image", str(IMAGES / "chelsea.png"),
             "--output", str(out / "r18.onnx"), "--dynamic-axes", "--no-simplify", "--resize-policy", "squash"],
            scratch,
        ),
        "missing_weights": (["--arch", "resnet18", "--weights", "nope.pth"], scratch),
        "pickled_module": (["--arch", "resnet18", "--weights", "module.pth"], scratch),
        "garbage_weights": (["--arch", "resnet18", "--weights", "garbage.pth"], scratch),
        "wrong_keys": (["--arch", "resnet18", "--weights", "wrong_keys.pth"], scratch),
        "other_arch_weights": (["--arch", "resnet50", "--weights", str(bundled_efficientnet_lite0_weights())], scratch),
        "unknown_arch": (["--arch", "vgg16"], scratch),
        "opset_too_old": (["--opset", "9"], scratch),
        "callable_not_importable": (["--arch", "my_models.nets:build_model"], scratch),
        "image_not_an_image": (["--test-image", "notes.jpg"], scratch),
        "image_truncated": (["--test-image", "truncated.jpg"], scratch),
        "image_empty": (["--test-image", "empty.jpg"], scratch),
        "output_dir_missing": (["--output", str(scratch / "no" / "such" / "model.onnx")], scratch),
        "output_dir_read_only": (["--output", str(read_only / "model.onnx")], scratch),
    }
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    processes = {
        name: subprocess.Popen(
            [sys.executable, str(SCRIPT), *args], cwd=cwd, env=env, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        for name, (args, cwd) in cases.items()
    }
    results = {}
    try:
        for name, process in processes.items():
            stdout, stderr = process.communicate(timeout=RUN_TIMEOUT_S)
            results[name] = (process.returncode, stdout, stderr)
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()
                process.wait()
    results["paths"] = {"weights": weights, "r18": out / "r18.onnx", "effnet": effnet_cwd / "models" / "model.onnx"}
    return results


def test_default_model_export_prints_both_predictions_and_parity(runs):
    code, stdout, stderr = runs["effnet"]
    assert code == 0, stderr
    assert re.search(r"PyTorch\s+967 espresso \(\d+\.\d+%\)", stdout)
    assert re.search(r"ONNX Runtime\s+967 espresso \(\d+\.\d+%\)", stdout)
    assert re.search(r"simplified with onnxsim in [\d.]+ s: \d+ -> \d+ nodes", stdout)
    assert re.search(r"parity: 6 images, batch sizes 1, 4: top-1 agreement 100.0%, top-5 agreement 100.0%", stdout)
    artifact = runs["paths"]["effnet"]
    assert artifact.is_file()  # the default --output, models/ created in the working directory
    assert read_metadata(artifact).resize_policy == "center_crop"


def test_torchvision_style_resnet18_weights_via_the_cli(runs):
    code, stdout, stderr = runs["resnet18"]
    assert code == 0, stderr
    torch_line = re.search(r"PyTorch\s+(\d+ .+) \(", stdout)
    onnx_line = re.search(r"ONNX Runtime\s+(\d+ .+) \(", stdout)
    assert torch_line and onnx_line and torch_line.group(1) == onnx_line.group(1)
    assert "parity: 6 images" in stdout and "simplified" not in stdout
    metadata = read_metadata(runs["paths"]["r18"])
    assert metadata.arch == "resnet18" and metadata.resize_policy == "squash"
    assert metadata.weights_sha256 == file_sha256(runs["paths"]["weights"])
    assert metadata.mean == (0.485, 0.456, 0.406)


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing_weights", r"weights file nope.pth: no such file"),
        ("garbage_weights", r"weights file garbage.pth: not a readable PyTorch checkpoint"),
        ("pickled_module", r"weights file module.pth: holds pickled Python objects \(torch.nn.modules.linear.Linear\)"),
        ("wrong_keys", r"does not match architecture resnet18: 1 missing keys \(layer2.1.conv2.weight\); "
                       r"1 unexpected keys \(classifier.weight\)"),
        ("other_arch_weights", r"does not match architecture resnet50: .*missing keys.*unexpected keys \(_conv_stem"
                               r".*the keys match --arch efficientnet_lite0"),
        ("unknown_arch", r"unknown architecture 'vgg16': known are efficientnet_lite0, resnet18, resnet34, resnet50"),
        ("opset_too_old", r"--opset 9: not supported; use 13..20"),
        ("callable_not_importable", r"--arch my_models.nets:build_model: cannot import module 'my_models.nets'"),
        ("image_not_an_image", r"--test-image notes.jpg: not an image"),
        ("image_truncated", r"--test-image truncated.jpg: image data is truncated"),
        ("image_empty", r"--test-image empty.jpg: empty image"),
        ("output_dir_missing", r"--output: output directory .*/no/such does not exist"),
        ("output_dir_read_only", r"--output: output directory .* is not writable"),
    ],
)
def test_bad_input_exits_non_zero_with_one_clear_line(runs, case, message):
    code, stdout, stderr = runs[case]
    assert code == 2, (stdout, stderr)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert re.search(message, lines[0]), lines[0]
    assert "Traceback" not in stderr + stdout
