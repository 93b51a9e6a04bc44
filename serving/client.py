"""The one HTTP client for an onnxship server: scripts/test_server.py and the release flow's smoke
tests both use it.

Keys: `api_key` travels in `X-API-Key`. Behind Cerebrium's gateway, which wants its own JWT in
`Authorization: Bearer`, pass that as `gateway_token`; the server reads its key from X-API-Key.
Without a gateway the server also accepts `Authorization: Bearer <api_key>`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import requests

ImageInput = str | Path | bytes


class ClientError(RuntimeError):
    """A request failed; names the URL, the HTTP status (None: no answer) and the server's error."""

    def __init__(self, url: str, status: int | None, error: str):
        self.url = url
        self.status = status
        self.error = error
        self.retry_after: float | None = None  # seconds, from the server's Retry-After
        where = f"HTTP {status}" if status is not None else "no response"
        super().__init__(f"{url}: {where}: {error}")


@dataclass(frozen=True)
class Prediction:
    class_id: int
    label: str
    confidence: float
    processing_time: float  # seconds the server spent (decode, queue, inference)
    latency: float  # seconds this client waited for the whole HTTP exchange


@dataclass(frozen=True)
class Candidate:
    class_id: int
    label: str
    confidence: float


@dataclass(frozen=True)
class TopPrediction:
    predictions: list[Candidate] = field(default_factory=list)
    processing_time: float = 0.0
    latency: float = 0.0


def _image_part(image: ImageInput, index: int) -> tuple[str, bytes, str]:
    if isinstance(image, (bytes, bytearray, memoryview)):
        return (f"image-{index}", bytes(image), "application/octet-stream")
    path = Path(image)
    try:
        return (path.name, path.read_bytes(), "application/octet-stream")
    except OSError as error:
        raise ClientError(str(path), None, f"cannot read the image file: {error.strerror or error}") from None


RETRYABLE = (408, 503, 504)  # the server's failure model: safe to send again (predictions have no side effects)
MAX_RETRY_WAIT_S = 5.0


class ClassifierClient:
    """`retries`: how many times a request that met a retryable answer (408, 503 after its Retry-After,
    504) or a dropped connection is sent again before ClientError is raised (default 0: never)."""

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 30.0, gateway_token: str | None = None,
                 retries: int = 0):
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.retries = retries
        self.session = requests.Session()
        if api_key:
            self.session.headers["X-API-Key"] = api_key
        if gateway_token:
            self.session.headers["Authorization"] = f"Bearer {gateway_token}"

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> ClassifierClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:  # never show keys
        return f"ClassifierClient({self.url!r})"

    # -- plumbing ---------------------------------------------------------------------------
    def _request(self, method: str, path: str, ok=(200,), **kwargs) -> tuple[requests.Response, float]:
        for attempt in range(self.retries + 1):
            try:
                return self._send(method, path, ok, **kwargs)
            except ClientError as error:
                if attempt == self.retries or not (error.status in RETRYABLE or error.status is None
                                                   and "refused" not in error.error):
                    raise
                time.sleep(min(error.retry_after or 0.5, MAX_RETRY_WAIT_S))
        raise AssertionError("unreachable")

    def _send(self, method: str, path: str, ok, **kwargs) -> tuple[requests.Response, float]:
        url = f"{self.url}{path}"
        start = time.perf_counter()
        try:
            response = self.session.request(method, url, timeout=kwargs.pop("timeout", self.timeout), **kwargs)
        except requests.ConnectionError as error:
            reason = "connection refused (is the server running and the URL right?)" \
                if "refused" in str(error).lower() else f"cannot connect: {error}"
            raise ClientError(url, None, reason) from None
        except requests.Timeout:
            raise ClientError(url, None, f"no answer within {self.timeout:g} s") from None
        except requests.RequestException as error:
            raise ClientError(url, None, str(error)) from None
        latency = time.perf_counter() - start
        if response.status_code not in ok:
            error = ClientError(url, response.status_code, self._error_text(response))
            retry_after = response.headers.get("Retry-After", "")
            error.retry_after = float(retry_after) if retry_after.replace(".", "", 1).isdigit() else None
            raise error
        return response, latency

    @staticmethod
    def _error_text(response: requests.Response) -> str:
        try:
            body = response.json()
        except ValueError:
            return response.text.strip()[:500] or response.reason
        if isinstance(body, dict):
            return str(body.get("error") or body.get("detail") or body.get("message") or body)
        return str(body)[:500]

    def _json(self, response: requests.Response) -> dict:
        try:
            return response.json()
        except ValueError:
            raise ClientError(response.url, response.status_code, f"not JSON: {response.text[:200]!r}") from None

    def _post_images(self, path: str, images: list[ImageInput], params: dict | None = None):
        files = [("file", _image_part(image, i)) for i, image in enumerate(images)]
        response, latency = self._request("POST", path, files=files, params=params)
        return self._json(response), latency

    # -- endpoints --------------------------------------------------------------------------
    def health(self) -> dict:
        response, _ = self._request("GET", "/health")
        return self._json(response)

    def ready(self) -> bool:
        try:
            response, _ = self._request("GET", "/ready", ok=(200, 503), timeout=min(self.timeout, 5.0))
        except ClientError:
            return False
        return response.status_code == 200

    def wait_until_ready(self, timeout: float = 120.0, interval: float = 0.5,
                         abort: Callable[[], str | None] | None = None) -> None:
        """Poll GET /ready until 200; ClientError after `timeout` seconds, or as soon as `abort()`
        returns a reason (e.g. the server process that should answer has exited)."""
        deadline = time.monotonic() + timeout
        last = "never answered"
        while True:
            reason = abort() if abort else None
            if reason:
                raise ClientError(f"{self.url}/ready", None, f"{reason} (last: {last})")
            try:
                response, _ = self._request("GET", "/ready", ok=(200, 503), timeout=min(self.timeout, 5.0))
                if response.status_code == 200:
                    return
                last = f"HTTP 503 {self._error_text(response)}"
            except ClientError as error:
                last = error.error
            if time.monotonic() >= deadline:
                raise ClientError(f"{self.url}/ready", None, f"not ready after {timeout:g} s (last: {last})")
            time.sleep(interval)

    def model_info(self) -> dict:
        response, _ = self._request("GET", "/model")
        return self._json(response)

    def predict(self, image: ImageInput) -> Prediction:
        body, latency = self._post_images("/predict", [image])
        return self._prediction(body, body["processing_time"], latency)

    def predict_top(self, image: ImageInput, k: int = 5) -> TopPrediction:
        body, latency = self._post_images("/predict/top", [image], params={"k": k})
        return TopPrediction(
            predictions=[Candidate(int(p["class_id"]), p.get("label", ""), float(p["confidence"]))
                         for p in body["predictions"]],
            processing_time=float(body["processing_time"]),
            latency=latency,
        )

    def predict_many(self, images: list[ImageInput]) -> list[Prediction]:
        """One request carrying every image; one Prediction per image, in order."""
        if not images:
            return []
        body, latency = self._post_images("/predict", list(images))
        results = body["results"] if "results" in body else [body]
        return [self._prediction(result, body["processing_time"], latency) for result in results]

    @staticmethod
    def _prediction(result: dict, processing_time: float, latency: float) -> Prediction:
        return Prediction(
            class_id=int(result["class_id"]),
            label=str(result.get("label", "")),
            confidence=float(result["confidence"]),
            processing_time=float(processing_time),
            latency=latency,
        )
