"""The model zoo: architectures, torchvision-compatible ResNet keys, weights files, clear errors."""

from __future__ import annotations

import textwrap

import pytest
import torch

from flows.model.zoo import ARCHITECTURES, ModelLoadError, load_model
from flows.model.resnet import resnet18, resnet34, resnet50


@pytest.mark.parametrize(
    "build, parameters, keys",
    [(resnet18, 11_689_512, 122), (resnet34, 21_797_672, 218), (resnet50, 25_557_032, 320)],
)
def test_resnets_have_torchvisions_parameter_counts_and_keys(build, parameters, keys):
    # The figures of torchvision.models.resnetXX(): same parameters, same state-dict entries.
    with torch.device("meta"):
        model = build()
    assert sum(p.numel() for p in model.parameters()) == parameters
    state = model.state_dict()
    assert len(state) == keys
    for key in ("conv1.weight", "bn1.running_var", "layer1.0.conv1.weight", "layer2.0.downsample.0.weight",
                "layer2.0.downsample.1.num_batches_tracked", "layer4.1.bn2.bias", "fc.weight", "fc.bias"):
        assert key in state


def test_bundled_efficientnet_is_pretrained_and_in_eval_mode():
    loaded = load_model("efficientnet_lite0")
    assert not loaded.module.training
    assert loaded.spec.mean == (0.5, 0.5, 0.5) and loaded.spec.std == (0.5, 0.5, 0.5)
    assert loaded.spec.num_classes == 1000 and loaded.spec.input_size == 224
    assert loaded.weights_path is not None and loaded.weights_path.name.endswith(".pth")
    assert len(loaded.weights_sha256) == 64
    assert set(ARCHITECTURES) == {"efficientnet_lite0", "resnet18", "resnet34", "resnet50"}


def test_resnet_random_init_only_when_asked_and_seeded():
    with pytest.raises(ModelLoadError, match="resnet18 has no bundled weights: pass .*--weights.*--random-init"):
        load_model("resnet18")
    first, second = load_model("resnet18", random_init=True), load_model("resnet18", random_init=True)
    assert first.weights_sha256 == second.weights_sha256  # seeded: the same weights every time
    assert load_model("resnet18", random_init=True, seed=1).weights_sha256 != first.weights_sha256


def saved(tmp_path, name, obj):
    path = tmp_path / name
    torch.save(obj, path)
    return path


@pytest.fixture(scope="module")
def torchvision_style_state():
    """A state dict with torchvision's resnet18 layout (random values, seed 7)."""
    torch.manual_seed(7)
    model = resnet18()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):  # non-trivial running statistics
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    return model.state_dict()


@pytest.mark.parametrize("layout", ["plain", "wrapped", "dataparallel", "no_num_batches_tracked"])
def test_resnet18_loads_torchvision_style_checkpoints(tmp_path, torchvision_style_state, layout):
    state = dict(torchvision_style_state)
    if layout == "wrapped":
        obj = {"epoch": 90, "state_dict": state}
    elif layout == "dataparallel":
        obj = {f"module.{k}": v for k, v in state.items()}
    elif layout == "no_num_batches_tracked":  # torchvision's original hub files predate that buffer
        obj = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    else:
        obj = state
    loaded = load_model("resnet18", saved(tmp_path, "w.pth", obj))
    assert torch.equal(loaded.module.state_dict()["layer3.1.conv2.weight"], state["layer3.1.conv2.weight"])
    assert torch.equal(loaded.module.state_dict()["bn1.running_var"], state["bn1.running_var"])
    assert loaded.spec.mean == (0.485, 0.456, 0.406)


def test_fine_tuned_head_sets_the_number_of_classes(tmp_path):
    torch.manual_seed(0)
    path = saved(tmp_path, "ten.pth", resnet18(num_classes=10).state_dict())
    loaded = load_model("resnet18", path)
    assert loaded.spec.num_classes == 10
    assert loaded.spec.class_labels() == tuple(f"class_{i}" for i in range(10))


def test_mismatched_keys_are_named_with_counts(tmp_path, torchvision_style_state):
    state = dict(torchvision_style_state)
    state.pop("layer4.1.bn2.weight")
    state["head.weight"] = torch.zeros(3)
    with pytest.raises(ModelLoadError) as error:
        load_model("resnet18", saved(tmp_path, "w.pth", state))
    message = str(error.value)
    assert "does not match architecture resnet18" in message
    assert "1 missing keys (layer4.1.bn2.weight)" in message
    assert "1 unexpected keys (head.weight)" in message


def test_weights_of_another_architecture_are_recognised(tmp_path):
    with torch.device("meta"):
        keys = resnet34().state_dict().keys()
    state = {k: torch.zeros(1) for k in keys}
    with pytest.raises(ModelLoadError, match=r"96 unexpected keys \(layer1.2.conv1.weight.*the keys match --arch resnet34"):
        load_model("resnet18", saved(tmp_path, "r34.pth", state))


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "no such file"),
        (b"", "empty \\(0 bytes\\)"),
        (b"this is not a checkpoint\n", "not a readable PyTorch checkpoint"),
    ],
)
def test_unreadable_weights(tmp_path, content, message):
    path = tmp_path / "weights.pth"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ModelLoadError, match=f"weights file .*weights.pth: {message}"):
        load_model("resnet18", path)


def test_weights_that_are_not_a_state_dict(tmp_path):
    with pytest.raises(ModelLoadError, match="not a state dict of tensors"):
        load_model("resnet18", saved(tmp_path, "list.pth", [torch.zeros(2)]))
    with pytest.raises(ModelLoadError, match="is a directory"):
        load_model("resnet18", tmp_path)


def test_unknown_arch_lists_the_known_ones():
    with pytest.raises(ModelLoadError, match="unknown architecture 'resnet19': known are efficientnet_lite0, resnet18, resnet34, resnet50"):
        load_model("resnet19")


@pytest.fixture
def user_package(tmp_path, monkeypatch):
    """A user's own architecture module, importable as `mynets.tiny`."""
    package = tmp_path / "mynets"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "tiny.py").write_text(textwrap.dedent('''
        import torch
        from torch import nn

        class Tiny(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv = nn.Conv2d(3, 4, 3, stride=4)
                self.fc = nn.Linear(4, 3)

            def forward(self, x):
                return self.fc(self.conv(x).mean(dim=(2, 3)))

        def build():
            model = Tiny()
            model.input_size = 32
            model.mean = (0.5, 0.5, 0.5)
            model.std = (0.25, 0.25, 0.25)
            model.resize_policy = "squash"
            model.labels = ["cat", "dog", "bird"]
            return model

        def plain():
            return Tiny()

        def not_a_module():
            return 42

        NOT_CALLABLE = 3
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "mynets.tiny"
    import sys

    for name in ("mynets", "mynets.tiny"):
        sys.modules.pop(name, None)


def test_custom_callable_with_attributes(user_package, tmp_path):
    loaded = load_model(f"{user_package}:build")
    spec = loaded.spec
    assert (spec.input_size, spec.mean, spec.std, spec.default_resize_policy) == (32, (0.5,) * 3, (0.25,) * 3, "squash")
    assert spec.num_classes == 3 and spec.class_labels() == ("cat", "dog", "bird")
    weights = saved(tmp_path, "tiny.pth", loaded.module.state_dict())
    again = load_model(f"{user_package}:build", weights)
    assert again.weights_path == weights


def test_custom_callable_defaults(user_package):
    spec = load_model(f"{user_package}:plain").spec
    assert (spec.input_size, spec.mean, spec.default_resize_policy, spec.num_classes) == (
        224, (0.485, 0.456, 0.406), "center_crop", 3)


@pytest.mark.parametrize(
    "target, message",
    [
        ("no_such_package.nets:build", "cannot import module 'no_such_package.nets'"),
        ("{pkg}:missing", "has no attribute 'missing'"),
        ("{pkg}:NOT_CALLABLE", "is a int, not a callable"),
        ("{pkg}:not_a_module", "returned int, expected a torch.nn.Module"),
        ("{pkg}:", "expected 'package.module:callable'"),
    ],
)
def test_bad_custom_callables(user_package, target, message):
    with pytest.raises(ModelLoadError, match=message):
        load_model(target.format(pkg=user_package))
