"""int8 and fp16 variants: real quantization and fp16 conversion run under ONNX Runtime CPU, judged
against PyTorch on real photos; the gate's choice and refusals; the MLflow record; bad input.
The variants are built once per session (`variant_set` in tests/conftest.py)."""

from __future__ import annotations

import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from flows.params import ParameterError, ReleaseParams, VariantBudget
from flows.stages.agreement import Agreement
from flows.stages.gate import choose_variant
from flows.stages.variants import VariantError, build_int8, preprocessing_nodes

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_int8_and_fp16_keep_the_contract_the_metadata_and_the_answers(variant_set, default_artifact):
    import onnx

    fp32 = variant_set.fp32
    assert fp32.agreement.images == 50 and fp32.agreement.top1_agreement == 1.0
    for precision, max_size in (("int8", 0.35), ("fp16", 0.6)):
        variant = variant_set.get(precision)
        assert variant.usable, variant.refused
        session = variant.classifier.session
        assert [(i.name, i.type) for i in session.get_inputs()] == [("images", "tensor(uint8)")]
        assert [(o.name, o.type) for o in session.get_outputs()] == [("logits", "tensor(float)"),
                                                                   ("probabilities", "tensor(float)")]
        assert variant.classifier.metadata == replace(fp32.classifier.metadata, precision=precision)
        assert variant.size_bytes < max_size * fp32.size_bytes
        graph = onnx.load(str(variant.path)).graph
        kept = {node.name: node.op_type for node in graph.node}
        source = onnx.load(str(default_artifact))
        assert all(kept.get(name) for name in preprocessing_nodes(source)), "the preprocessing must stay float"
    assert variant_set.get("fp16").agreement.top1_agreement == 1.0
    int8 = variant_set.get("int8").agreement
    assert int8.top1_agreement >= 0.9, int8.disagreements
    assert abs(int8.accuracy - fp32.agreement.accuracy) <= 0.06


def figures(precision: str, agreement: float = 0.96, correct: int = 61, images: int = 67, speedup: float | None = 1.3,
            refused: str | None = None, labelled: int | None = None):
    labelled = images if labelled is None else labelled
    return SimpleNamespace(precision=precision, refused=refused, speedup=speedup,
                           agreement=Agreement(images, agreement, agreement, labelled, correct, correct))


def test_the_gate_takes_the_fastest_variant_inside_the_budget():
    fp32 = figures("fp32", 1.0, 62, speedup=1.0)
    choice = choose_variant([fp32, figures("int8"), figures("fp16", 1.0, 62, speedup=0.8)], VariantBudget(), "cpu")
    assert choice.chosen == "int8"
    assert choice.verdicts == {"fp32": "baseline", "int8": "chosen", "fp16": "refused"}
    assert any("0.80x fp32's speed" in r and r.startswith("FAIL") for r in choice.decisions["fp16"])
    assert choice.lines()[1].startswith("int8: chosen (67 evaluation images")


@pytest.mark.parametrize("variant, reason", [
    (figures("int8", agreement=0.93), "top-1 agreement with PyTorch 93.0% (min 95.0%)"),
    (figures("int8", correct=59), "drop 4.5 points, max 2.0"),
    (figures("int8", speedup=1.02), "1.02x fp32's speed at batch 1 on this CPU (min 1.05x)"),
    (figures("int8", refused="only 4 evaluation images (min 50): not built"), "only 4 evaluation images"),
])
def test_a_variant_outside_the_budget_is_refused_with_the_reason_and_fp32_ships(variant, reason):
    choice = choose_variant([figures("fp32", 1.0, 62, speedup=1.0), variant], VariantBudget(), "cpu")
    assert choice.chosen == "fp32" and choice.verdicts["int8"] == "refused"
    assert any(r.startswith("FAIL") and reason in r for r in choice.decisions["int8"]), choice.decisions


def test_without_labels_only_agreement_is_judged_and_a_cuda_target_takes_fp16_on_agreement():
    fp32 = figures("fp32", 1.0, 0, speedup=1.0, labelled=0)
    variants = [fp32, figures("int8", labelled=0, speedup=None), figures("fp16", 1.0, 0, speedup=None, labelled=0)]
    choice = choose_variant(variants, VariantBudget(), "cuda")
    assert choice.chosen == "fp16"
    assert "ok: no labelled evaluation images: accuracy not judged, agreement only" in choice.decisions["fp16"]
    assert any("GPU speed not measured here" in r for r in choice.decisions["fp16"])
    assert any(r.startswith("FAIL: int8 is taken for CPU targets only") for r in choice.decisions["int8"])


def test_a_broken_calibration_collapses_int8_and_the_gate_refuses_it(variant_set, default_artifact, tmp_path):
    """Calibrated on flat grey squares, the activation ranges are wrong for photos: the quantized
    model still builds and runs, but its answers are not the model's."""
    from flows.stages.agreement import measure_agreement
    from flows.stages.accuracy import open_classifier
    from flows.stages.evaluate import Variant

    flat = []
    for index in range(16):
        flat.append(tmp_path / f"flat{index}.png")
        Image.new("RGB", (64, 64), (8 * index,) * 3).save(flat[-1])
    built = build_int8(default_artifact, tmp_path / "broken.int8.onnx", flat)
    classifier = open_classifier(built.path, like=variant_set.fp32.classifier)
    broken = Variant("int8", built.path, classifier, measure_agreement(classifier, variant_set.reference),
                     built.size_bytes, speedup=1.5)
    assert broken.agreement.top1_agreement < 0.6
    choice = choose_variant([variant_set.fp32, broken], VariantBudget(), "cpu")
    assert choice.chosen == "fp32" and choice.verdicts["int8"] == "refused"
    assert any(r.startswith("FAIL: top-1 agreement with PyTorch") for r in choice.decisions["int8"])


def test_unreadable_or_too_few_calibration_images_refuse_int8(default_artifact, images_dir, tmp_path):
    paths = [images_dir / "coffee.png", images_dir / "chelsea.png"]
    for name in ("notes.jpg", "empty.png"):
        paths.append(tmp_path / name)
        paths[-1].write_bytes(b"" if name == "empty.png" else b"not an image")
    with pytest.raises(VariantError, match=r"at least 16 readable images, got 2 of 4; unreadable: notes.jpg"):
        build_int8(default_artifact, tmp_path / "out.onnx", paths)
    assert not (tmp_path / "out.onnx").exists()


def test_too_few_evaluation_images_refuse_int8_before_quantizing(default_artifact, default_model, tmp_path):
    """The default release (the bundled photos alone) keeps fp32 and says how to give more images."""
    from flows.reference import load_references
    from flows.stages.evaluate import prepare_variants
    from serving.runtime import Classifier

    params = ReleaseParams(server={"device": "cpu"})
    fp32 = Classifier(default_artifact, device="cpu")
    result = prepare_variants(params, default_model, fp32, default_artifact, load_references(), tmp_path,
                              say=lambda _: None)
    assert [v.precision for v in result.variants] == ["fp32", "int8"]
    int8 = result.get("int8")
    assert int8.refused.startswith("only 4 evaluation images (min 50): not built; give --eval-images DIR")
    assert not list(tmp_path.glob("*.onnx"))
    assert choose_variant(result.variants, params.variant_budget, "cpu").chosen == "fp32"


def test_the_flags_parse_and_bad_eval_folders_are_refused_before_any_work(tmp_path, images_dir):
    from flows.cli import parse_command
    from flows.validate import validate_release_params

    params, _ = parse_command(["--variants", "int8,fp16", "--eval-images", str(images_dir),
                               "--calibration-images", str(tmp_path), "--variant-budget.min-eval-images", "20"])
    assert params.variants == ("fp32", "int8", "fp16") and params.eval_images == images_dir
    assert params.calibration_images == tmp_path and params.variant_budget.min_eval_images == 20

    with pytest.raises(ParameterError, match=r"eval_images .*nowhere: no such directory"):
        validate_release_params(ReleaseParams(eval_images=tmp_path / "nowhere", state_dir=tmp_path / "state"))
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "manifest.csv").write_text("file,class_index\nmissing.jpg,1\n")
    with pytest.raises(ParameterError, match=r"line 2: .*missing.jpg does not exist"):
        validate_release_params(ReleaseParams(eval_images=tmp_path / "eval", state_dir=tmp_path / "state"))


def test_every_variant_is_a_child_run_with_the_same_metric_keys(variant_set, tmp_path):
    from flows.record import ReleaseRun, log_variant_runs
    from flows.stages.benchmark import paired_speedup

    params = ReleaseParams(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", state_dir=tmp_path / "state")
    images = variant_set.split.evaluation[:1]
    for variant in variant_set.variants[1:]:
        variant.speedup = paired_speedup(variant_set.fp32.classifier, variant.classifier, [images[0].path], 0.3)
    choice = choose_variant(variant_set.variants, VariantBudget(), "cpu")
    run = ReleaseRun(params)
    rows = log_variant_runs(run, params, variant_set, choice, {})
    children = run.client.search_runs([run.experiment_id], f"tags.mlflow.parentRunId = '{run.run_id}'")
    by_precision = {child.data.tags["precision"]: child for child in children}
    assert sorted(by_precision) == ["fp16", "fp32", "int8"] and len(rows) == 3
    keys = {precision: set(child.data.metrics) for precision, child in by_precision.items()}
    assert keys["fp32"] == keys["int8"] == keys["fp16"] and "variant/top1_agreement" in keys["fp32"]
    for precision, child in by_precision.items():
        assert child.data.metrics["variant/chosen"] == (1.0 if precision == choice.chosen else 0.0)
        assert child.data.tags["variant.verdict"] == choice.verdicts[precision]
        assert child.data.metrics["variant/top1_agreement"] == variant_set.get(precision).agreement.top1_agreement
    assert math.isclose(by_precision["int8"].data.metrics["variant/speedup"], variant_set.get("int8").speedup)
    assert run.client.get_run(run.run_id).data.tags["precision"] == choice.chosen


def test_the_variants_command_builds_one_variant_and_refuses_bad_input(default_artifact, tmp_path):
    from serving.artifact import read_metadata

    def command(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "flows.stages.variants", *map(str, args)], cwd=REPO_ROOT,
                              capture_output=True, text=True, timeout=300)

    done = command(default_artifact, "--precision", "fp16", "--output", tmp_path / "model.fp16.onnx")
    assert done.returncode == 0, done.stderr
    assert "fp16 variant" in done.stdout and read_metadata(tmp_path / "model.fp16.onnx").precision == "fp16"
    again = command(tmp_path / "model.fp16.onnx", "--precision", "int8", "--output", tmp_path / "x.onnx",
                    "--calibration-images", tmp_path)
    assert again.returncode == 2 and "already a fp16 variant" in again.stderr
    missing = command(default_artifact, "--precision", "int8", "--output", tmp_path / "model.int8.onnx")
    assert missing.returncode == 2 and "int8 needs --calibration-images DIR" in missing.stderr
