"""serving.images.load_image on the awkward images users send, all generated with PIL here."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from serving.images import ImageError, decode_image, load_image


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height 8-bit RGB pixels (the bomb's trick: tiny file)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("policy", ["squash", "center_crop"])
def test_rgb_photo_gives_uint8_hwc_at_input_size(images_dir, policy):
    pixels = load_image(images_dir / "coffee.png", 224, policy)
    assert pixels.shape == (224, 224, 3) and pixels.dtype == np.uint8


def test_center_crop_keeps_the_middle_and_squash_keeps_everything():
    # 300x100: red | green | blue thirds. The crop sees only green; squash sees all three.
    strip = np.zeros((100, 300, 3), np.uint8)
    strip[:, :100, 0] = strip[:, 100:200, 1] = strip[:, 200:, 2] = 255
    data = encode(Image.fromarray(strip), "PNG")
    crop = load_image(data, 32, "center_crop")
    assert (crop[..., 1] > 200).all() and (crop[..., 0] < 30).all() and (crop[..., 2] < 30).all()
    squash = load_image(data, 32, "squash")
    assert squash[16, 2, 0] > 200 and squash[16, 16, 1] > 200 and squash[16, 29, 2] > 200


def test_grayscale_becomes_three_equal_channels(images_dir):
    pixels = load_image(images_dir / "camera.png", 64, "squash")  # an L-mode photo
    assert pixels.shape == (64, 64, 3)
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()


def test_palette_image_with_transparency_is_composited_on_white():
    image = Image.new("P", (16, 16), 0)
    image.putpalette([10, 20, 30] + [200, 0, 0] * 255)
    image.paste(1, (0, 0, 8, 16))  # left half: palette entry 1 (red), right half: entry 0
    pixels = load_image(encode(image, "PNG", transparency=0), 16, "squash")
    assert tuple(pixels[8, 2]) == (200, 0, 0)
    assert tuple(pixels[8, 13]) == (255, 255, 255)  # the transparent colour shows white


def test_rgba_is_composited_on_white():
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[:, :8] = (0, 0, 255, 255)  # opaque blue
    rgba[:, 8:] = (0, 0, 255, 0)  # fully transparent
    pixels = load_image(encode(Image.fromarray(rgba, "RGBA"), "PNG"), 16, "squash")
    assert tuple(pixels[8, 2]) == (0, 0, 255)
    assert tuple(pixels[8, 13]) == (255, 255, 255)


def test_la_half_transparent_black_is_grey():
    la = Image.new("LA", (8, 8), (0, 128))
    pixels = load_image(encode(la, "PNG"), 8, "squash")
    assert np.allclose(pixels.astype(int), 127, atol=2)


def test_cmyk_jpeg_is_converted_to_rgb():
    cmyk = Image.new("CMYK", (32, 32), (0, 255, 255, 0))  # red in CMYK
    pixels = load_image(encode(cmyk, "JPEG", quality=95), 16, "squash")
    r, g, b = (int(v) for v in pixels[8, 8])
    assert r > 200 and g < 60 and b < 60


def test_16_bit_grayscale_is_scaled_to_8_bit():
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    data = encode(Image.fromarray(ramp), "PNG")
    pixels = load_image(data, 64, "squash")
    assert pixels.dtype == np.uint8
    assert pixels[0, 0, 0] <= 2 and pixels[-1, -1, 0] >= 253  # full range kept, not clipped at 255/65535


def test_exif_orientation_is_applied():
    # Stored 40 wide x 20 tall, red left / blue right; orientation 6 = rotate 90 deg clockwise to view.
    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:, :20] = (255, 0, 0)
    stored[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(Image.fromarray(stored), "JPEG", exif=exif.tobytes(), quality=95)
    upright = decode_image(data)
    assert upright.size == (20, 40)  # width, height: portrait as the camera intended
    top, bottom = np.asarray(upright)[5, 10], np.asarray(upright)[35, 10]
    assert top[0] > 200 and top[2] < 60  # the stored left (red) is now on top
    assert bottom[2] > 200 and bottom[0] < 60


def test_truncated_image_is_refused(images_dir):
    data = (images_dir / "rocket.jpg").read_bytes()
    with pytest.raises(ImageError, match="truncated"):
        load_image(data[: len(data) // 3], 224, "squash")
    png = (images_dir / "coffee.png").read_bytes()
    with pytest.raises(ImageError, match="truncated|corrupt"):
        load_image(png[: len(png) // 2], 224, "squash")


def test_decompression_bomb_is_refused_before_decoding():
    bomb = png_header_only(50_000, 50_000)  # 2.5 gigapixels declared in a 100-byte file
    assert len(bomb) < 200
    with pytest.raises(ImageError, match="decompression bomb"):  # Pillow's own guard fires first here
        load_image(bomb, 224, "squash")
    big = png_header_only(8_000, 8_000)  # 64 MP: below Pillow's guard, above onnxship's 40 MP limit
    with pytest.raises(ImageError, match="too large: 8000x8000 = 64,000,000 pixels exceeds the limit of 40,000,000"):
        load_image(big, 224, "squash")


def test_pixel_limit_is_configurable():
    data = encode(Image.new("RGB", (100, 100)), "PNG")
    with pytest.raises(ImageError, match="exceeds the limit of 5,000 pixels"):
        load_image(data, 8, "squash", max_pixels=5_000)


def test_empty_input_is_refused(tmp_path):
    with pytest.raises(ImageError, match="0 bytes"):
        load_image(b"", 224, "squash")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(ImageError, match="0 bytes"):
        load_image(empty, 224, "squash")


def test_not_an_image_is_refused(tmp_path):
    with pytest.raises(ImageError, match="not an image"):
        load_image(b"name,class\nx,1\n", 224, "squash")
    with pytest.raises(ImageError, match="no such file"):
        load_image(tmp_path / "missing.png", 224, "squash")


def test_unknown_resize_policy_is_refused():
    with pytest.raises(ImageError, match="unknown resize policy 'stretch'"):
        load_image(encode(Image.new("RGB", (8, 8)), "PNG"), 8, "stretch")
