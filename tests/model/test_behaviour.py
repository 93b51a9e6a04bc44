"""Behavioural checks of the exported default model on real photos (the server's path: bytes ->
serving.images -> ONNX Runtime): what a user would call "the same picture" keeps its class."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageOps

from serving.runtime import Classifier

# Photos whose top-1 is confident (>= 0.5) under the default centre crop; chelsea.png is a near tie
# between two cat classes (see README.md, "From a PyTorch model to a validated ONNX artifact"), so it is left out of invariance checks.
PHOTOS = {"coffee.png": 967, "camera.png": 872, "motorcycle_left.png": 665}


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def jpeg(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", **options)
    return buffer.getvalue()


def exif_rotated(image: Image.Image) -> bytes:
    """Pixels stored rotated, with the EXIF orientation tag that tells a viewer to turn them back."""
    exif = Image.Exif()
    exif[0x0112] = 6  # display = rotate the stored pixels 90 degrees clockwise
    return jpeg(image.transpose(Image.Transpose.ROTATE_90), quality=95, exif=exif.tobytes())


VARIANTS = {
    "mirrored": lambda im: png(ImageOps.mirror(im)),
    "jpeg quality 75": lambda im: jpeg(im, quality=75),
    "half resolution": lambda im: png(im.resize((im.width // 2, im.height // 2))),
    "white border": lambda im: png(ImageOps.expand(im, border=im.width // 10, fill=(255, 255, 255))),
    "opaque RGBA": lambda im: png(im.convert("RGBA")),
    "EXIF-rotated phone JPEG": exif_rotated,
}


@pytest.fixture(scope="module")
def classifier(default_artifact):
    return Classifier(default_artifact, device="cpu")


@pytest.mark.parametrize("variant", VARIANTS)
def test_same_picture_same_class(classifier, images_dir, variant):
    for name, expected in PHOTOS.items():
        image = Image.open(images_dir / name).convert("RGB")
        probabilities = classifier.predict(classifier.load_input(VARIANTS[variant](image)))[0]
        assert int(probabilities.argmax()) == expected, f"{name} {variant}: got {int(probabilities.argmax())}"


def test_batch_composition_does_not_change_an_answer(classifier, images_dir):
    pixels = np.stack([classifier.load_input(images_dir / name) for name in PHOTOS])
    together = classifier.predict(pixels)
    for row, name in zip(together, PHOTOS):
        alone = classifier.predict(classifier.load_input(images_dir / name))[0]
        np.testing.assert_allclose(row, alone, atol=1e-5)
        assert int(row.argmax()) == PHOTOS[name]
