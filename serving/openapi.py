"""The OpenAPI document of the HTTP API, built from the code it describes.

The answers' shapes are the TypedDicts below: serving/app.py builds its answers as these types and
the document's schemas are generated from them (pydantic's TypeAdapter), so neither can drift
alone. The request forms come from serving/ingress.py's constants, the key headers from
serving/auth.py, the limits from the server's configuration and `k`'s range from the model's class
count. The same function feeds GET /openapi.json (with --docs) and `python -m serving
--print-openapi`, which writes it without starting a server (docs/openapi.json: `make openapi`).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import ConfigDict, Field, TypeAdapter
from typing_extensions import NotRequired, TypedDict

import serving
from serving import openapi_examples as examples
from serving.auth import API_KEY_HEADER
from serving.handoff import STATUS_NAMES
from serving.ingress import FILE_FIELD

OPENAPI_VERSION = "3.1.0"
RAW_MEDIA_TYPES = ("image/jpeg", "image/png", "image/webp", "image/gif", "image/bmp", "image/tiff",
                   "application/octet-stream")
METRICS_MEDIA_TYPE = "text/plain"
STRICT = ConfigDict(extra="forbid")

ClassId = Annotated[int, Field(ge=0, description="index of the class in the model's labels")]
Confidence = Annotated[float, Field(ge=0, le=1, description="the class's softmax probability")]
Label = Annotated[str, Field(description="the class's name, from the model's metadata")]
Seconds = Annotated[float, Field(ge=0, description="the server's seconds for the whole request "
                                                   "(decode, queue, inference)")]


class Prediction(TypedDict):
    __pydantic_config__ = STRICT
    class_id: ClassId
    confidence: Confidence
    label: Label


class PredictionAnswer(TypedDict):
    """POST /predict with one image."""
    __pydantic_config__ = STRICT
    class_id: ClassId
    confidence: Confidence
    label: Label
    processing_time: Seconds


class TopK(TypedDict):
    __pydantic_config__ = STRICT
    predictions: Annotated[list[Prediction], Field(min_length=1, description="the k best classes, best first")]


class TopKAnswer(TypedDict):
    """POST /predict/top with one image."""
    __pydantic_config__ = STRICT
    predictions: Annotated[list[Prediction], Field(min_length=1, description="the k best classes, best first")]
    processing_time: Seconds


class PredictionBatch(TypedDict):
    """POST /predict with several images: one result per image, in the order sent."""
    __pydantic_config__ = STRICT
    results: Annotated[list[Prediction], Field(min_length=2)]
    count: Annotated[int, Field(ge=2)]
    processing_time: Seconds


class TopKBatch(TypedDict):
    """POST /predict/top with several images: one result per image, in the order sent."""
    __pydantic_config__ = STRICT
    results: Annotated[list[TopK], Field(min_length=2)]
    count: Annotated[int, Field(ge=2)]
    processing_time: Seconds


class Error(TypedDict):
    """Every error: what is wrong and how to fix it; `status` repeats the HTTP status."""
    __pydantic_config__ = STRICT
    error: str
    status: Annotated[int, Field(ge=400, le=599)]


class Health(TypedDict):
    __pydantic_config__ = STRICT
    status: Literal["ok"]


class Readiness(TypedDict):
    __pydantic_config__ = STRICT
    ready: bool
    status: Literal["ready", "degraded", "starting", "unavailable", "draining"]
    workers: Annotated[dict[str, Literal[tuple(sorted(set(STATUS_NAMES.values())))]],
                       Field(description="worker name (predict_0, ...) -> its state")]


class Batching(TypedDict):
    workers: int
    max_batch_size: int
    batch_timeout: float
    max_images_per_request: int


class LimitSettings(TypedDict):
    max_queued_images: int
    request_timeout: float
    max_payload_bytes: int
    max_image_pixels: int
    max_request_pixels: int


class Startup(TypedDict):
    """Time to ready (README, "Time to ready"); null until every worker has loaded the model."""
    ready_after_s: Annotated[float | None, Field(description="seconds from the main process's start to ready")]
    session_build_s: NotRequired[Annotated[float, Field(description="the slowest worker's ONNX Runtime session")]]
    warmup_s: NotRequired[Annotated[float, Field(description="the slowest worker's first inference calls")]]


class GpuOptions(TypedDict):
    """The GPU provider settings (README, "Devices and CPU tuning"); only on CUDA."""
    tensorrt: bool
    trt_fp16: bool
    trt_cache_dir: str
    cudnn_conv_algo_search: Literal["HEURISTIC", "EXHAUSTIVE", "DEFAULT"]


class ModelDescription(TypedDict):
    """GET /model: the artifact's metadata, the registry version and how it is served."""
    name: str | None
    version: str | None
    run_id: str | None
    source: str
    file: str
    sha256: str
    arch: str
    input_size: int
    layout: str
    resize_policy: str
    num_classes: int
    weights_sha256: str
    exported_at: str
    opset: int
    onnxship_version: str
    precision: Literal["fp32", "int8", "fp16"]
    device: str
    providers: list[str]
    workers: list[dict]
    startup: Startup
    gpu: NotRequired[GpuOptions]
    batching: Batching
    limits: LimitSettings
    server_version: str


SCHEMAS = (PredictionAnswer, PredictionBatch, TopKAnswer, TopKBatch, Error, Health, Readiness, ModelDescription)


def component_schemas() -> dict:
    adapters = [(shape.__name__, "serialization", TypeAdapter(shape)) for shape in SCHEMAS]
    _, definitions = TypeAdapter.json_schemas(adapters, ref_template="#/components/schemas/{model}")
    return definitions["$defs"]


def ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def json_answer(schema: str, description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": ref(schema)}}}


def error(description: str, *headers: str) -> dict:
    answer = json_answer("Error", description)
    if headers:
        answer["headers"] = {name: HEADERS[name] for name in headers}
    return answer


HEADERS = {
    "Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer", "minimum": 0}},
    "WWW-Authenticate": {"description": 'Bearer realm="onnxship"', "schema": {"type": "string"}},
}


def error_responses(config, authenticated: bool, reads_image: bool) -> dict:
    found = {}
    if reads_image:
        found["400"] = error(
            "the request carries no usable image: no `file` part or wrong field name, empty file, not an image, "
            "truncated or corrupt image, decompression bomb, over --max-image-pixels "
            f"({config.max_image_pixels:,}) per image or --max-request-pixels ({config.max_request_pixels:,}) per "
            "request, bad base64, malformed JSON, JSON without `image`/`images`, with both or with other keys, "
            f"more than {config.max_images_per_request} images; the message names the problem")
    if authenticated:
        found["401"] = error("missing or wrong API key", "WWW-Authenticate")
    if reads_image:
        found["408"] = error(f"the body did not arrive within --body-timeout ({config.body_timeout:g} s)")
        found["413"] = error(f"body over --max-payload-bytes ({int(config.max_payload_bytes):,} bytes)")
        found["415"] = error("a Content-Type that is none of the documented request forms")
        found["500"] = error("inference failed in the model runtime (logged on the server); "
                               "never the answer to a client's mistake")
        found["503"] = error("overloaded (the admission bound), no inference worker ready, draining, or the worker "
                               "computing the request died; retry after Retry-After, on any replica", "Retry-After")
        found["504"] = error(f"no answer within --request-timeout ({config.request_timeout:g} s); the work was "
                               "dropped")
    return found


def image_request_body(config) -> dict:
    most = config.max_images_per_request
    binary = {"type": "string", "format": "binary"}
    base64 = {"type": "string", "contentEncoding": "base64", "minLength": 1,
              "description": "the image file's bytes in base64 (a data: URL is accepted too)"}
    one = {"type": "object", "additionalProperties": False, "required": ["image"],
           "properties": {"image": base64}}
    several = {"type": "object", "additionalProperties": False, "required": ["images"],
               "properties": {"images": {"type": "array", "items": base64, "minItems": 1, "maxItems": most}}}
    raw = {"schema": binary}
    return {
        "required": True,
        "description": (f"One image, or up to {most} (--max-images-per-request), in one of three forms; at most "
                        f"{int(config.max_payload_bytes):,} bytes (--max-payload-bytes). JPEG, PNG, WebP, GIF, BMP "
                        "and TIFF decode; the bytes must be an image, which a schema cannot say (else 400)."),
        "content": {
            "multipart/form-data": {
                "schema": {"type": "object", "required": [FILE_FIELD], "properties": {
                    FILE_FIELD: {"type": "array", "items": binary, "minItems": 1, "maxItems": most,
                                 "description": f"one `{FILE_FIELD}` part per image (each with a filename)"}}},
                "encoding": {FILE_FIELD: {"contentType": "image/*, application/octet-stream"}},
            },
            **{media: raw for media in RAW_MEDIA_TYPES},
            "application/json": {
                "schema": {"oneOf": [one, several]},
                "examples": {
                    "one image": {"summary": "a 64x64 JPEG of an espresso", "value": {"image": examples.ESPRESSO}},
                    "several images": {"summary": "the espresso and a 64x64 JPEG of a cat",
                                       "value": {"images": [examples.ESPRESSO, examples.CAT]}},
                },
            },
        },
    }


def success(single: str, batch: str, single_example: dict, batch_example: dict) -> dict:
    return {"description": "one image: its answer; several: `results`, one per image in the order sent",
            "content": {"application/json": {
                "schema": {"oneOf": [ref(single), ref(batch)]},
                "examples": {"one image": {"summary": "the answer to the one-image request example",
                                           "value": single_example},
                             "several images": {"summary": "the answer to the several-images request example",
                                                "value": batch_example}}}}}


def predict_operation(config, authenticated: bool, top: bool, num_classes: int | None) -> dict:
    operation = {
        "operationId": "predict_top" if top else "predict",
        "summary": "The k best classes of each image" if top else "The best class of each image",
        "requestBody": image_request_body(config),
        "responses": {
            "200": success("TopKAnswer", "TopKBatch", examples.TOP_ANSWER, examples.TOP_BATCH_ANSWER) if top
            else success("PredictionAnswer", "PredictionBatch", examples.ANSWER, examples.BATCH_ANSWER),
            **error_responses(config, authenticated, reads_image=True),
        },
    }
    if top:
        k = {"type": "integer", "minimum": 1, "default": 5}
        if num_classes is not None:
            k["maximum"] = num_classes
            within = f"1..{num_classes} (the model's classes)"
        else:
            within = "1..the model's class count (`num_classes` of GET /model)"
        operation["parameters"] = [{"name": "k", "in": "query", "required": False, "schema": k, "example": 3,
                                    "description": f"how many classes per image, {within}"}]
        operation["responses"]["422"] = error(f"`k` is not an integer in {within}")
    return operation


def build_document(config, num_classes: int | None = None) -> dict:
    """The OpenAPI document of a server with `config` serving a model with `num_classes` classes
    (None: `k`'s maximum is left to the model, checked by the server)."""
    authenticated = not config.no_auth
    secured = {"security": [{"ApiKey": []}, {"Bearer": []}]} if authenticated else {}
    document = {
        "openapi": OPENAPI_VERSION,
        "info": {"title": "onnxship", "version": serving.__version__,
                 "description": "Image classification with an onnxship ONNX artifact (README.md, \"Serving\"). "
                                "Errors are JSON {\"error\", \"status\"}; a client's mistake is never a 500."},
        "paths": {
            "/health": {"get": {"operationId": "health", "summary": "Liveness: the HTTP server answers (no key)",
                                "responses": {"200": json_answer("Health", "alive")}}},
            "/ready": {"get": {"operationId": "ready", "summary": "Readiness (no key)", "responses": {
                "200": json_answer("Readiness", "`ready` or `degraded`: at least one worker serves"),
                "503": json_answer("Readiness", "`starting`, `unavailable` or `draining`: send no work here")}}},
            "/metrics": {"get": {"operationId": "metrics", "summary": "Prometheus metrics, merged over all "
                                 "processes (no key)", "responses": {"200": {
                                     "description": "the Prometheus text exposition format 0.0.4",
                                     "content": {METRICS_MEDIA_TYPE: {"schema": {"type": "string"}}}}}}},
            "/model": {"get": {"operationId": "model", "summary": "The model served and how", **secured,
                               "responses": {"200": json_answer("ModelDescription", "the model"),
                                             **error_responses(config, authenticated, reads_image=False)}}},
            "/predict": {"post": {**predict_operation(config, authenticated, False, num_classes), **secured}},
            "/predict/top": {"post": {**predict_operation(config, authenticated, True, num_classes), **secured}},
        },
        "components": {"schemas": component_schemas()},
    }
    if authenticated:
        document["components"]["securitySchemes"] = {
            "ApiKey": {"type": "apiKey", "in": "header", "name": API_KEY_HEADER,
                       "description": "the server's API_KEY (works behind gateways that keep Authorization)"},
            "Bearer": {"type": "http", "scheme": "bearer", "description": "the server's API_KEY as a Bearer token"},
        }
    return document

