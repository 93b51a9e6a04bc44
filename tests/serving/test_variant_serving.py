"""The real server runs the int8 and fp16 artifacts unchanged and answers in the same JSON as fp32."""

from __future__ import annotations

import requests

from tests.serving.conftest import running


def shape(value):
    """The JSON's structure: keys and value types, not the values."""
    if isinstance(value, dict):
        return {key: shape(item) for key, item in value.items()}
    if isinstance(value, list):
        return [shape(item) for item in value]
    return type(value).__name__


def answers(server, images_dir) -> dict:
    def files(*names):
        return [("file", (name, (images_dir / name).read_bytes())) for name in names]

    post = lambda path, *names: requests.post(f"{server.url}{path}", files=files(*names), headers=server.headers,
                                              timeout=60)
    replies = {"predict": post("/predict", "coffee.png"), "top": post("/predict/top?k=3", "coffee.png"),
               "many": post("/predict", "coffee.png", "rocket.jpg"),
               "bad": requests.post(f"{server.url}/predict", files=[("file", ("x.png", b"nope"))],
                                    headers=server.headers, timeout=60)}
    assert [r.status_code for r in replies.values()] == [200, 200, 200, 400]
    return {name: reply.json() for name, reply in replies.items()}


def test_int8_and_fp16_serve_the_same_json_as_fp32(server, variant_set, images_dir, tmp_path):
    fp32 = answers(server, images_dir)
    assert fp32["predict"]["class_id"] == 967  # espresso
    for precision in ("int8", "fp16"):
        with running(variant_set.get(precision).path, tmp_path, "--workers", "1") as variant:
            got = answers(variant, images_dir)
            described = requests.get(f"{variant.url}/model", headers=variant.headers, timeout=30).json()
        assert {name: shape(body) for name, body in got.items()} == {name: shape(body) for name, body in fp32.items()}
        assert got["predict"]["class_id"] == 967 and got["predict"]["label"] == "espresso"
        assert [p["class_id"] for p in got["top"]["predictions"]][:1] == [967]
        assert got["bad"]["status"] == 400
        assert described["precision"] == precision
