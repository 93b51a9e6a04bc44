"""Image decoding and resizing: the one implementation of "file or bytes -> RGB uint8 at the
model's input size". Export checks, parity, benchmarks and the server all call `load_image`.

Policies for the awkward inputs:
- transparency (RGBA, LA, PA, palette with a transparent colour) is composited on white, the
  way a browser shows the image on a white page;
- 16-bit images are scaled to 8 bits (value / 257), grayscale and CMYK are converted to RGB;
- EXIF orientation is applied, so a phone photo is classified the way it is seen;
- animated or multi-page files: the first frame;
- a file whose header declares more than `max_pixels` pixels is refused before decoding.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 40_000_000  # 40 MP: larger than any phone photo, far below a decompression bomb
RESIZE_POLICIES = ("squash", "center_crop")
CENTER_CROP_FRACTION = 0.875  # the standard ImageNet evaluation: resize to 256, crop 224
WHITE = (255, 255, 255)

ImageFile.LOAD_TRUNCATED_IMAGES = False


class ImageError(ValueError):
    """The bytes are not an image this project can classify; the message says why."""


def load_image(
    source: bytes | str | Path,
    size: int,
    policy: str,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """Decode `source` (raw bytes or a file path) to a (size, size, 3) uint8 RGB array."""
    data = read_source(source)
    image = decode_image(data, max_pixels=max_pixels, draft_to=resized_short_side(size, policy))
    return resize_to_input(image, size, policy)


def read_source(source: bytes | str | Path) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    path = Path(source)
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ImageError(f"{path}: is a directory, not an image file") from None
    except PermissionError:
        raise ImageError(f"{path}: permission denied") from None


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, draft_to: int | None = None) -> Image.Image:
    """Decode bytes to an upright RGB PIL image, or raise ImageError naming the problem.

    `draft_to` lets JPEG decoding skip detail that resizing would throw away (DCT scaling): the
    decoded image keeps both sides >= draft_to, so the resize that follows sees enough pixels.
    `max_pixels` applies to the size the file declares.
    """
    return finish_decode(open_image(data, max_pixels, draft_to), len(data))


def open_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, draft_to: int | None = None,
               limit_decoded: bool = False) -> Image.Image:
    """Read the header (no pixels yet) and plan JPEG DCT scaling; `.size` is then what decoding
    will produce. `max_pixels` applies to the declared size, or with `limit_decoded` to the size
    decoding will really produce (a 48 MP JPEG scaled by 1/8 costs 0.75 MP), which is what the
    server charges against its per-image and per-request pixel limits."""
    if not data:
        raise ImageError("empty image: the body or file has 0 bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if not limit_decoded:
                refuse_oversized(image, max_pixels)
            if draft_to is not None and image.format == "JPEG":
                image.draft(None, (draft_to, draft_to))
            if limit_decoded:
                refuse_oversized(image, max_pixels)
    except ImageError:
        raise
    except Exception as error:  # noqa: BLE001 - translated to one of the documented messages
        raise _decode_error(error, len(data)) from None
    return image


def finish_decode(image: Image.Image, size_in_bytes: int = 0) -> Image.Image:
    """Decode the pixels of an image from `open_image`: upright, RGB."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image.load()
    except Exception as error:  # noqa: BLE001
        raise _decode_error(error, size_in_bytes) from None
    return to_rgb(upright(image))


def _decode_error(error: Exception, size_in_bytes: int) -> Exception:
    if isinstance(error, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return ImageError(f"image refused as a decompression bomb: {error}")
    if isinstance(error, UnidentifiedImageError):
        return ImageError(
            f"not an image: the {size_in_bytes} bytes are in no format Pillow can read "
            "(send JPEG, PNG, WebP, GIF, BMP or TIFF)"
        )
    if isinstance(error, (OSError, SyntaxError, ValueError)):
        return ImageError(f"image data is truncated or corrupt: {error}")
    return error


def refuse_oversized(image: Image.Image, max_pixels: int) -> None:
    width, height = image.size
    if width * height > max_pixels:
        raise ImageError(
            f"image too large: {width}x{height} = {width * height:,} pixels exceeds the limit of "
            f"{max_pixels:,} pixels (a possible decompression bomb); downscale it before sending"
        )


def upright(image: Image.Image) -> Image.Image:
    try:
        ImageOps.exif_transpose(image, in_place=True)  # in place: no copy of an already upright photo
    except Exception:  # a malformed EXIF block must not make a readable photo unusable
        pass
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        image = sixteen_bit_to_8_bit(image)
    if image.mode == "F":
        image = Image.fromarray(np.clip(np.asarray(image), 0, 255).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        return composite_on_white(image)
    return image.convert("RGB")


def sixteen_bit_to_8_bit(image: Image.Image) -> Image.Image:
    values = np.asarray(image, dtype=np.uint32)
    scale = 257 if values.max(initial=0) > 255 or image.mode != "I" else 1
    return Image.fromarray((values // scale).clip(0, 255).astype(np.uint8), mode="L")


def composite_on_white(image: Image.Image) -> Image.Image:
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, WHITE + (255,))
    return Image.alpha_composite(background, rgba).convert("RGB")


def resized_short_side(size: int, policy: str) -> int:
    if policy == "squash":
        return size
    if policy == "center_crop":
        return round(size / CENTER_CROP_FRACTION)
    raise ImageError(f"unknown resize policy {policy!r}: expected one of {', '.join(RESIZE_POLICIES)}")


def resize_to_input(image: Image.Image, size: int, policy: str) -> np.ndarray:
    """Resize an RGB image to (size, size, 3) uint8 with the artifact's resize policy."""
    short_side = resized_short_side(size, policy)
    if policy == "squash":
        resized = image.resize((size, size), Image.Resampling.BILINEAR)
    else:
        box = center_crop_box(image.size, size, short_side)
        resized = image.resize((size, size), Image.Resampling.BILINEAR, box=box)
    return np.asarray(resized, dtype=np.uint8)


def center_crop_box(image_size: tuple[int, int], size: int, short_side: int) -> tuple[float, float, float, float]:
    """The source region that "resize the short side to `short_side`, then crop the central
    size x size" keeps. Resizing only that region gives the same pixels without computing the
    ones the crop would throw away."""
    width, height = image_size
    scale = short_side / min(width, height)
    resized_width, resized_height = max(size, round(width * scale)), max(size, round(height * scale))
    left, top = (resized_width - size) // 2, (resized_height - size) // 2
    x_scale, y_scale = resized_width / width, resized_height / height
    return (left / x_scale, top / y_scale, (left + size) / x_scale, (top + size) / y_scale)
