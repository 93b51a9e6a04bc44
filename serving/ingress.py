"""Reading a prediction request in the HTTP process: body limits, the three upload forms, decoding.

Everything that can be the client's fault fails here, before any slot of the inference queue is
used, with a 4xx that names the problem: body size (413), body read timeout (408), media type
(415), multipart/JSON/base64 structure, image count, per-image and per-request pixel budgets and
undecodable images (400). A client that goes away mid-upload is an expected event (a counter, one
debug line, never a 500: serving/prediction.py).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import time
from dataclasses import dataclass

from fastapi import HTTPException
from fastapi.responses import JSONResponse

from serving import multipart
from serving.images import ImageError, finish_decode, open_image, resize_to_input, resized_short_side
from serving.metrics import metrics

log = logging.getLogger(__name__)

FILE_FIELD = "file"
MAX_FIELDS = 100  # text fields tolerated in a multipart body (clients add some; none is used)
SUPPORTED = "multipart/form-data with a 'file' field, a raw image/* body, or application/json {\"image\": \"<base64>\"}"


@dataclass(frozen=True)
class Limits:
    max_payload_bytes: int
    max_images: int
    max_image_pixels: int
    max_request_pixels: int


def error_response(status: int, message, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "status": status}, status_code=status, headers=headers)


def bad_request(message: str) -> HTTPException:
    return HTTPException(status_code=400, detail=message)


class PayloadTooLarge(HTTPException):
    def __init__(self, limit: int):
        super().__init__(status_code=413, detail=f"request body larger than {limit:,} bytes (the server's "
                         "--max-payload-bytes); downscale or compress the image")


def declared_too_large(headers, max_bytes: int) -> bool:
    """The request's Content-Length is over `max_bytes` (refused before any byte of the body is read).
    `headers`: raw (lower-case name, value) byte pairs, as in an ASGI scope."""
    for name, value in headers:
        if name == b"content-length":
            return value.isdigit() and int(value) > max_bytes
    return False


def limited_receive(receive, max_bytes: int):
    """`receive` that raises PayloadTooLarge once more than `max_bytes` of body arrived (chunked uploads)."""
    seen = 0

    async def limited():
        nonlocal seen
        message = await receive()
        seen += len(message.get("body", b""))
        if seen > max_bytes:
            raise PayloadTooLarge(max_bytes)
        return message

    return limited


def too_large_response(max_bytes: int) -> JSONResponse:
    error = PayloadTooLarge(max_bytes)
    return error_response(error.status_code, error.detail, {"Connection": "close"})


class IngressLimitMiddleware:
    """Refuse bodies over `max_bytes`: early on Content-Length, else while streaming (chunked).
    (The body read timeout is enforced by the HTTP protocol: serving/httpserver.py.)"""

    def __init__(self, app, max_bytes: int):
        if not isinstance(max_bytes, int):
            raise TypeError(f"max_bytes must be an int number of bytes, got {max_bytes!r}")
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
        elif declared_too_large(scope.get("headers") or (), self.max_bytes):
            await too_large_response(self.max_bytes)(scope, receive, send)
        else:
            await self.app(scope, limited_receive(receive, self.max_bytes), send)


def decode_base64(value, where: str) -> bytes:
    if not isinstance(value, str):
        raise bad_request(f"{where} must be a base64 string, got {type(value).__name__}")
    if value.startswith("data:") and "," in value:  # data URL: data:image/png;base64,....
        value = value.split(",", 1)[1]
    try:
        data = base64.b64decode("".join(value.split()), validate=True)
    except (binascii.Error, ValueError) as error:
        raise bad_request(f"bad base64 in {where}: {error}") from None
    if not data:
        raise bad_request(f"{where} is empty: no image bytes after base64 decoding")
    return data


def too_many(count: int | str, limit: int) -> HTTPException:
    return bad_request(f"{count} images in one request; the limit is {limit} (--max-images-per-request)")


def read_uploads(content_type: str, body: bytes, max_images: int) -> list[tuple[str, bytes]]:
    """The images of a request body as (name, bytes), or an HTTP error naming what is wrong."""
    media = content_type.split(";")[0].strip().lower()
    if media == "multipart/form-data":
        uploads = read_multipart(content_type, body, max_images)
    elif media.startswith("image/") or media == "application/octet-stream":
        if not body:
            raise bad_request(f"empty body: the {media} request carries 0 bytes")
        uploads = [("body", body)]
    elif media == "application/json" or media.endswith("+json"):
        uploads = read_json(body, max_images)
    elif not media:
        if not body:
            raise bad_request(f"no image in the request: send {SUPPORTED}")
        raise HTTPException(415, f"missing Content-Type: send {SUPPORTED}")
    else:
        raise HTTPException(415, f"unsupported Content-Type {media!r}: send {SUPPORTED}")
    if len(uploads) > max_images:
        raise too_many(len(uploads), max_images)
    return uploads


def read_multipart(content_type: str, body: bytes, max_images: int) -> list[tuple[str, bytes]]:
    try:
        parts = multipart.parse(body, multipart.boundary_of(content_type), max_files=max_images, max_fields=MAX_FIELDS)
    except multipart.MultipartError as error:
        raise bad_request(f"malformed multipart body: {error}") from None
    except OverflowError as error:
        if "files" in str(error):
            raise too_many(f"more than {max_images}", max_images) from None
        raise bad_request(f"malformed multipart body: {error}") from None
    files = [part for part in parts if part.name == FILE_FIELD]
    if not files:
        other = sorted({part.name for part in parts if part.filename is not None})
        if other:
            raise bad_request(f"wrong field name: the image is in {', '.join(map(repr, other))}; "
                              f"send it in the multipart field {FILE_FIELD!r}")
        raise bad_request(f"no file: the multipart body has no {FILE_FIELD!r} field")
    uploads = []
    for index, part in enumerate(files, start=1):
        if part.filename is None:
            raise bad_request(f"field {FILE_FIELD!r} #{index} is text, not a file upload")
        name = part.filename or f"file #{index}"
        if not part.data:
            raise bad_request(f"empty file: {name!r} has 0 bytes")
        uploads.append((name, part.data))
    return uploads


def read_json(body: bytes, max_images: int = 1 << 30) -> list[tuple[str, bytes]]:
    if not body.strip():
        raise bad_request('empty JSON body: send {"image": "<base64>"}')
    try:
        document = json.loads(body)
    except RecursionError:
        raise bad_request("malformed JSON: nested too deeply (expected {\"image\": \"<base64>\"})") from None
    except (ValueError, UnicodeDecodeError) as error:
        raise bad_request(f"malformed JSON: {error}") from None
    if not isinstance(document, dict):
        raise bad_request(f'JSON body must be an object like {{"image": "<base64>"}}, got {type(document).__name__}')
    forms = [key for key in ("image", "images") if key in document]
    if len(forms) == 1 and len(document) > 1:
        extra = ", ".join(repr(k)[:40] for k in list(document) if k != forms[0])
        raise bad_request(f"unexpected JSON field(s) {extra}: send only {forms[0]!r}")
    if len(forms) == 2:
        raise bad_request("both 'image' and 'images': send one image as 'image' or several as 'images'")
    if "image" in document:
        return [("image", decode_base64(document["image"], "'image'"))]
    if "images" in document:
        images = document["images"]
        if not isinstance(images, list) or not images:
            raise bad_request("'images' must be a non-empty list of base64 strings")
        if len(images) > max_images:
            raise too_many(len(images), max_images)
        return [(f"images[{i}]", decode_base64(v, f"'images'[{i}]")) for i, v in enumerate(images)]
    keys = ", ".join(repr(k)[:40] for k in list(document)[:10])
    raise bad_request(f"JSON body has no 'image' field (keys: {keys or 'none'})")


def open_all(uploads: list[tuple[str, bytes]], size: int, policy: str, limits: Limits) -> tuple[list, int]:
    """Read every image header (no pixels yet) and charge the per-image and per-request pixel
    budgets, so a request over budget is refused before any pixel is decoded. Returns the opened
    images and the pixels their decoding will produce (JPEGs after DCT scaling)."""
    draft_to = resized_short_side(size, policy)
    opened, total = [], 0
    for name, data in uploads:
        try:
            image = open_image(data, limits.max_image_pixels, draft_to, limit_decoded=True)
        except ImageError as error:
            metrics().images_decoded.labels(outcome="rejected").inc()
            raise bad_request(_named(name, len(uploads)) + str(error)) from None
        total += image.width * image.height
        if total > limits.max_request_pixels:
            metrics().images_decoded.labels(outcome="rejected").inc()
            raise bad_request(f"the images of this request need more than {limits.max_request_pixels:,} pixels "
                              f"decoded (--max-request-pixels; JPEGs count after DCT scaling): send fewer or "
                              f"smaller images")
        opened.append((name, len(data), image))
    return opened, total


def decode_opened(opened: list, targets, size: int, policy: str) -> None:
    """Decode the images from `open_all` into `targets` (one [size, size, 3] uint8 view each:
    shared-memory slots). Pillow releases the GIL while it decodes, so this may run in a thread."""
    for index, target in enumerate(targets):
        decode_one(opened, index, target, size, policy)


def decode_one(opened: list, index: int, target, size: int, policy: str) -> None:
    """Decode image `index` of `opened` into `target` (errors name the file when there are several)."""
    m = metrics()
    name, length, image = opened[index]
    start = time.perf_counter()
    try:
        target[...] = resize_to_input(finish_decode(image, length), size, policy)
    except ImageError as error:
        m.images_decoded.labels(outcome="rejected").inc()
        raise bad_request(_named(name, len(opened)) + str(error)) from None
    m.images_decoded.labels(outcome="ok").inc()
    m.decode_duration.observe(time.perf_counter() - start)


def decode_into(uploads: list[tuple[str, bytes]], targets, size: int, policy: str, limits: Limits) -> None:
    opened, _ = open_all(uploads, size, policy, limits)
    decode_opened(opened, targets, size, policy)


def _named(name: str, count: int) -> str:
    return f"{name}: " if count > 1 else ""
