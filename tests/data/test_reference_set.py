"""The committed reference photos, their manifest and the ImageNet class list."""

from __future__ import annotations

import csv

import pytest

from flows.reference import (
    DEFAULT_IMAGES_DIR,
    DEFAULT_MANIFEST,
    ReferenceSetError,
    load_imagenet_labels,
    load_reference_set,
)
from serving.images import load_image


def test_imagenet_labels_are_the_1000_classes_in_index_order():
    labels = load_imagenet_labels()
    assert len(labels) == 1000
    assert labels[0] == "tench" and labels[285] == "Egyptian cat" and labels[967] == "espresso"
    assert labels[999] == "toilet tissue"


def test_default_reference_set_is_complete_and_licensed():
    references = load_reference_set()
    assert DEFAULT_MANIFEST.parent == DEFAULT_IMAGES_DIR
    labelled = {r.name: r.expected_class for r in references if r.expected_class is not None}
    assert labelled == {"chelsea.png": 285, "coffee.png": 967, "camera.png": 872, "motorcycle_left.png": 665}
    assert any(r.expected_class is None for r in references)  # parity-only photos are kept too
    labels = load_imagenet_labels()
    for reference in references:
        if reference.expected_class is not None:
            assert reference.label == labels[reference.expected_class]
        load_image(reference.path, 224, "center_crop")  # every photo decodes
    with DEFAULT_MANIFEST.open(newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert all(row["source"].strip() and row["license"].strip() for row in rows)
    listed = {row["file"] for row in rows}
    on_disk = {p.name for p in DEFAULT_IMAGES_DIR.iterdir() if p.name != "manifest.csv"}
    assert listed == on_disk, "every committed image is in the manifest and vice versa"


def test_label_column_is_optional(tmp_path, images_dir):
    (tmp_path / "a.png").write_bytes((images_dir / "coffee.png").read_bytes())
    (tmp_path / "manifest.csv").write_text("file,class_index,wnid\na.png,967,n07920052\n")
    [reference] = load_reference_set(tmp_path)
    assert reference.expected_class == 967 and reference.label == "espresso"


@pytest.mark.parametrize(
    "manifest, message",
    [
        ("file,label\na.png,x\n", "missing column\\(s\\) class_index"),
        ("file,class_index\nb.png,1\n", "line 2: .*b.png does not exist"),
        ("file,class_index\na.png,cat\n", "line 2: class_index 'cat' is not an integer"),
        ("file,class_index\na.png,1000\n", "class_index 1000 outside 0..999"),
        ("file,class_index\n", "lists no images"),
    ],
)
def test_bad_manifests_are_named(tmp_path, images_dir, manifest, message):
    (tmp_path / "a.png").write_bytes((images_dir / "coffee.png").read_bytes())
    (tmp_path / "manifest.csv").write_text(manifest)
    with pytest.raises(ReferenceSetError, match=message):
        load_reference_set(tmp_path)


def test_missing_manifest_and_directory(tmp_path):
    with pytest.raises(ReferenceSetError, match="no such file"):
        load_reference_set(tmp_path)
    with pytest.raises(ReferenceSetError, match="not a directory"):
        load_reference_set(tmp_path / "nope")
