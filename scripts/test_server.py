#!/usr/bin/env python
"""Send images to an onnxship server and print what it answers (the seed's test script).

    python scripts/test_server.py --url http://127.0.0.1:8192 --api-key KEY --images a.jpg b.png

Prints, per image, the class id, label, confidence and latency. Exits 0 when every request
succeeded, 1 when any failed, 2 when the server cannot be reached at all.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serving.client import ClassifierClient, ClientError  # noqa: E402

DEFAULT_IMAGES_DIR = Path(__file__).resolve().parents[1] / "data" / "images"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def default_images() -> list[Path]:
    return sorted(p for p in DEFAULT_IMAGES_DIR.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True, help="base URL of the server, e.g. http://127.0.0.1:8192")
    parser.add_argument("--api-key", default=os.environ.get("API_KEY"), help="API key (default: $API_KEY)")
    parser.add_argument("--gateway-token", default=os.environ.get("CEREBRIUM_API_KEY"),
                        help="Bearer token for a gateway in front of the server, e.g. Cerebrium's JWT "
                             "(default: $CEREBRIUM_API_KEY)")
    parser.add_argument("--images", nargs="+", type=Path, help=f"image files (default: {DEFAULT_IMAGES_DIR}/*)")
    parser.add_argument("--top-k", type=int, default=0, help="also print the k best classes per image")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per request")
    args = parser.parse_args(argv)

    images = args.images or default_images()
    client = ClassifierClient(args.url, api_key=args.api_key, timeout=args.timeout, gateway_token=args.gateway_token)
    try:
        health = client.health()
    except ClientError as error:
        print(f"error: cannot reach the server: {error}", file=sys.stderr)
        return 2
    print(f"server {args.url}: {health.get('status', health)}")

    failures = 0
    for image in images:
        try:
            result = client.predict(image)
        except ClientError as error:
            failures += 1
            print(f"FAIL {image}: {error}", file=sys.stderr)
            continue
        print(f"{image.name}: class {result.class_id} ({result.label}) confidence {result.confidence:.4f} "
              f"latency {result.latency * 1000:.1f} ms (server {result.processing_time * 1000:.1f} ms)")
        if args.top_k:
            try:
                top = client.predict_top(image, k=args.top_k)
            except ClientError as error:
                failures += 1
                print(f"FAIL {image} top-{args.top_k}: {error}", file=sys.stderr)
                continue
            for rank, candidate in enumerate(top.predictions, start=1):
                print(f"    {rank}. class {candidate.class_id} ({candidate.label}) {candidate.confidence:.4f}")
    print(f"{len(images) - failures}/{len(images)} images classified")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
