"""BENCHMARK BASELINE ONLY -- never deployed. A server shaped like the seed project's
(src/api/server.py): one uvicorn process, FastAPI, the upload written to a temporary file and
read back, full-resolution PIL decoding (no JPEG draft scaling), one ONNX Runtime call per image
with the session's default threading, all of it inside the async handler (one request at a time).

It still uses serving.images for decoding and resizing (the project's one implementation), so
the comparison measures the serving architecture, not a different resize.

    python -m benchmarks.baseline --model models/model.onnx --port 8193
"""

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from fastapi import FastAPI, File, HTTPException, UploadFile


def create_app(model_path: str | Path):
    import onnxruntime as ort

    from serving.artifact import INPUT_NAME, PROBABILITIES_NAME, read_metadata
    from serving.images import ImageError, decode_image, resize_to_input

    metadata = read_metadata(model_path)
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    app = FastAPI(title="seed-like baseline")

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.post("/predict")
    async def predict(file: UploadFile = File(...)):
        start = time.time()
        contents = await file.read()
        with tempfile.NamedTemporaryFile(suffix=".img", delete=False) as tmp:
            tmp.write(contents)
            path = tmp.name
        try:
            image = decode_image(Path(path).read_bytes())  # full decode, like Image.open(path).convert("RGB")
            array = resize_to_input(image, metadata.input_size, metadata.resize_policy)
        except ImageError as error:
            raise HTTPException(400, str(error)) from None
        finally:
            os.unlink(path)
        probabilities = session.run([PROBABILITIES_NAME], {INPUT_NAME: array[None]})[0][0]
        class_id = int(np.argmax(probabilities))
        return {"class_id": class_id, "confidence": float(probabilities[class_id]),
                "processing_time": time.time() - start}

    return app


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description="seed-like baseline server (benchmarks only)")
    parser.add_argument("--model", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8193)
    args = parser.parse_args(argv)
    uvicorn.run(create_app(args.model), host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
