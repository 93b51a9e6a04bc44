"""The OpenAPI document tells the truth: schemathesis (every check) fuzzes a live server against it and
finds nothing, docs/openapi.json is what a default server serves and what --print-openapi prints, and
the document's examples are real requests and the answers the server gives them."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from tests.serving.conftest import API_KEY, REPO_ROOT, running

DOCUMENT = REPO_ROOT / "docs" / "openapi.json"
SCHEMATHESIS_CONFIG = Path(__file__).with_name("schemathesis.toml")
SEED = 15
MAX_EXAMPLES = 20  # per operation and phase: ~260 requests, ~10 s on 2 cores


@pytest.fixture(scope="module")
def documented(default_artifact, tmp_path_factory):
    """A server with every default limit and the docs on: what docs/openapi.json describes."""
    with running(default_artifact, tmp_path_factory.mktemp("openapi"), "--workers", "1", "--docs") as server:
        yield server


def committed() -> dict:
    return json.loads(DOCUMENT.read_text())


def test_the_served_document_is_the_committed_one(documented):
    served = requests.get(f"{documented.url}/openapi.json", timeout=10).json()
    assert served == committed(), "docs/openapi.json is stale: run `make openapi` and commit it"


def test_schemathesis_finds_no_failure(documented, tmp_path):
    command = [str(Path(sys.executable).with_name("st")), "--config-file", str(SCHEMATHESIS_CONFIG), "run",
               f"{documented.url}/openapi.json", "--checks", "all", "--seed", str(SEED),
               "--max-examples", str(MAX_EXAMPLES), "--generation-database", "none", "--no-color"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=180,
                            env={**os.environ, "ONNXSHIP_TEST_API_KEY": API_KEY})
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert re.search(r"Operations:\s+6 selected / 6 total", output), output[-3000:]
    generated, passed = map(int, re.search(r"(\d+) generated, (\d+) passed", output).groups())
    assert generated == passed >= 200, output[-3000:]


def request_examples(document: dict, path: str) -> dict:
    return document["paths"][path]["post"]["requestBody"]["content"]["application/json"]["examples"]


def answer_examples(document: dict, path: str) -> dict:
    return document["paths"][path]["post"]["responses"]["200"]["content"]["application/json"]["examples"]


def assert_close(actual, expected, where: str = "answer") -> None:
    """Equal but for `processing_time`, confidences within 1e-4 (ONNX Runtime differs by CPU below that)."""
    if isinstance(expected, dict):
        keys = set(expected) - {"processing_time"}
        assert set(actual) - {"processing_time"} == keys, (where, actual)
        for key in keys:
            assert_close(actual[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, list):
        assert len(actual) == len(expected), (where, actual)
        for index, (got, want) in enumerate(zip(actual, expected)):
            assert_close(got, want, f"{where}[{index}]")
    elif isinstance(expected, float):
        assert actual == pytest.approx(expected, abs=1e-4), where
    else:
        assert actual == expected, where


@pytest.mark.parametrize("path", ["/predict", "/predict/top"])
def test_the_examples_are_real_requests_and_answers(documented, path):
    document = committed()
    k = document["paths"]["/predict/top"]["post"]["parameters"][0]["example"]
    answers = answer_examples(document, path)
    assert set(answers) == set(request_examples(document, path)) == {"one image", "several images"}
    for name, example in request_examples(document, path).items():
        response = requests.post(f"{documented.url}{path}", json=example["value"], params={"k": k} if "top" in path
                                 else None, headers=documented.headers, timeout=30)
        assert response.status_code == 200, response.text
        assert_close(response.json(), answers[name]["value"], f"{path} {name}")


def print_openapi(*args: str) -> dict:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("ONNXSHIP_") and k != "API_KEY"}
    result = subprocess.run([sys.executable, "-m", "serving", "--print-openapi", *args], cwd=REPO_ROOT,
                            env=environment, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_print_openapi_writes_the_document_without_a_server_or_a_key(default_artifact):
    assert print_openapi("--model", str(default_artifact)) == committed()
    bare = print_openapi("--no-auth", "--max-images-per-request", "4")
    top = bare["paths"]["/predict/top"]["post"]
    assert top["parameters"][0]["schema"] == {"type": "integer", "minimum": 1, "default": 5}  # no model: no maximum
    assert "security" not in top and "securitySchemes" not in bare["components"] and "401" not in top["responses"]
    images = top["requestBody"]["content"]["application/json"]["schema"]["oneOf"][1]["properties"]["images"]
    assert images["maxItems"] == 4


def test_print_openapi_names_a_model_it_cannot_read(tmp_path):
    result = subprocess.run([sys.executable, "-m", "serving", "--print-openapi", "--model", str(tmp_path / "no.onnx")],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "no.onnx: no such model file" in result.stderr, result.stderr


# What the fuzzer found in the server itself (fixed there, kept here).

def test_k_must_be_a_plain_integer(server, jpeg_bytes):
    for raw in (" 5", "5_0", "٥", "1" * 5000):
        response = requests.post(f"{server.url}/predict/top", params={"k": raw}, data=jpeg_bytes, timeout=30,
                                 headers={**server.headers, "Content-Type": "image/jpeg"})
        assert response.status_code == 422 and "expected an integer" in response.json()["error"], (raw, response.text)


def test_json_with_unknown_keys_or_both_forms_is_refused(server, jpeg_bytes):
    import base64

    image = base64.b64encode(jpeg_bytes).decode()
    for body, words in (({"image": image, "model": "x"}, "unexpected JSON field(s) 'model'"),
                        ({"image": image, "images": [image, image]}, "both 'image' and 'images'")):
        response = requests.post(f"{server.url}/predict", json=body, headers=server.headers, timeout=30)
        assert response.status_code == 400 and words in response.json()["error"], response.text
