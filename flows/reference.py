"""Reference images (real photos with expected ImageNet classes) and the ImageNet class names.

The manifest is a CSV with a header; required columns `file` and `class_index`, optional `label`,
`source`, `license` (other columns are ignored). An empty `class_index` marks a parity-only image
(no expected class: used to compare PyTorch with ONNX Runtime, skipped by accuracy).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_IMAGES_DIR = REPO_ROOT / "data" / "images"
DEFAULT_MANIFEST = DEFAULT_IMAGES_DIR / "manifest.csv"
IMAGENET_CLASSES = REPO_ROOT / "data" / "imagenet_classes.json"
REQUIRED_COLUMNS = ("file", "class_index")


class ReferenceSetError(ValueError):
    """The reference images or their manifest cannot be used; the message says why."""


@dataclass(frozen=True)
class ReferenceImage:
    path: Path
    expected_class: int | None
    label: str  # the expected class's name ("" for parity-only images)

    @property
    def name(self) -> str:
        return self.path.name


@lru_cache(maxsize=4)
def load_imagenet_labels(path: Path = IMAGENET_CLASSES) -> tuple[str, ...]:
    """The 1000 ImageNet-1k class names in index order (data/imagenet_classes.json)."""
    try:
        entries = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise ReferenceSetError(f"{path}: cannot read the ImageNet class list: {error}") from None
    names = [entry["name"] if isinstance(entry, dict) else str(entry) for entry in entries]
    if len(names) != 1000:
        raise ReferenceSetError(f"{path}: expected 1000 ImageNet classes, found {len(names)}")
    return tuple(names)


def load_reference_set(
    images_dir: str | Path = DEFAULT_IMAGES_DIR, manifest: str | Path | None = None
) -> list[ReferenceImage]:
    """Read the manifest (default: `<images_dir>/manifest.csv`) and check every file exists."""
    images_dir = Path(images_dir)
    manifest = Path(manifest) if manifest is not None else images_dir / "manifest.csv"
    if not images_dir.is_dir():
        raise ReferenceSetError(f"reference images directory {images_dir}: not a directory")
    if not manifest.is_file():
        raise ReferenceSetError(f"manifest {manifest}: no such file (CSV with columns file,class_index)")
    labels = load_imagenet_labels()
    with manifest.open(newline="", encoding="utf-8") as stream:
        reader = csv.DictReader(stream)
        columns = reader.fieldnames or []
        missing = [c for c in REQUIRED_COLUMNS if c not in columns]
        if missing:
            raise ReferenceSetError(
                f"manifest {manifest}: missing column(s) {', '.join(missing)} (has: {', '.join(columns) or 'none'})"
            )
        references = []
        for line, row in enumerate(reader, start=2):
            file = (row.get("file") or "").strip()
            if not file:
                raise ReferenceSetError(f"manifest {manifest} line {line}: empty 'file'")
            path = images_dir / file
            if not path.is_file():
                raise ReferenceSetError(f"manifest {manifest} line {line}: {path} does not exist")
            expected = parse_class(row.get("class_index"), manifest, line, len(labels))
            label = (row.get("label") or "").strip()
            if not label and expected is not None:
                label = labels[expected]
            references.append(ReferenceImage(path=path, expected_class=expected, label=label))
    if not references:
        raise ReferenceSetError(f"manifest {manifest}: lists no images")
    return references


def reference_paths(images_dir: Path | None = None, manifest: Path | None = None) -> tuple[Path, Path]:
    """The reference set a release uses: `data/images` by default; a directory alone means its manifest.csv."""
    if images_dir is None:
        return DEFAULT_IMAGES_DIR, Path(manifest) if manifest is not None else DEFAULT_MANIFEST
    return Path(images_dir), Path(manifest) if manifest is not None else Path(images_dir) / "manifest.csv"


def load_references(images_dir: Path | None = None, manifest: Path | None = None) -> list[ReferenceImage]:
    """The release's reference images (see `reference_paths`)."""
    return load_reference_set(*reference_paths(images_dir, manifest))


def parse_class(value: str | None, manifest: Path, line: int, num_classes: int) -> int | None:
    value = (value or "").strip()
    if not value:
        return None
    try:
        index = int(value)
    except ValueError:
        raise ReferenceSetError(f"manifest {manifest} line {line}: class_index {value!r} is not an integer") from None
    if not 0 <= index < num_classes:
        raise ReferenceSetError(f"manifest {manifest} line {line}: class_index {index} outside 0..{num_classes - 1}")
    return index
