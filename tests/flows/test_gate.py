"""The gate: thresholds, and no regression against the champion measured in the same process."""

from __future__ import annotations

from flows.stages.gate import CandidateFigures, ChampionComparison, compare_with_champion, evaluate_gate
from flows.params import GateThresholds, ParitySettings
from flows.reference import load_references
from flows.stages.accuracy import measure_accuracy
from serving.runtime import Classifier

GOOD = CandidateFigures(top1_agreement=1.0, max_prob_diff=2e-6, accuracy=1.0, accuracy_correct=4, accuracy_total=4,
                        p95_ms=20.0)


def comparison(candidate_accuracy=1.0, champion_accuracy=1.0, candidate_p95=20.0, champion_p95=20.0):
    return ChampionComparison("3", champion_accuracy, candidate_accuracy, champion_p95, candidate_p95)


def test_pass_without_champion():
    verdict = evaluate_gate(GOOD, GateThresholds(), ParitySettings())
    assert verdict.passed and verdict.verdict == "pass"
    assert any("no champion yet" in r for r in verdict.reasons)
    assert verdict.tags()["gate.verdict"] == "pass"


def test_pass_against_champion():
    verdict = evaluate_gate(GOOD, GateThresholds(), ParitySettings(), comparison(candidate_p95=22.0))
    assert verdict.passed, verdict.reasons
    assert verdict.tags()["gate.compared_with"] == "3"


def test_each_threshold_fails_with_a_readable_reason():
    bad = CandidateFigures(top1_agreement=0.5, max_prob_diff=0.2, accuracy=0.25, accuracy_correct=1, accuracy_total=4,
                           p95_ms=900.0)
    verdict = evaluate_gate(bad, GateThresholds(), ParitySettings())
    assert not verdict.passed
    text = "\n".join(verdict.failures)
    assert "parity top-1 agreement 50.0%" in text
    assert "max prob diff 2.00e-01" in text
    assert "reference accuracy 1/4 = 25.0% (min 75.0%)" in text
    assert "p95 latency 900.0 ms" in text
    assert verdict.reasons[0].startswith("FAIL")  # failures first
    assert verdict.summary().startswith("FAIL: ")


def test_regression_against_champion_fails():
    accuracy_drop = evaluate_gate(GOOD, GateThresholds(), ParitySettings(), comparison(candidate_accuracy=0.75))
    assert not accuracy_drop.passed
    assert "accuracy vs champion v3: 75.0% vs 100.0%" in accuracy_drop.failures[0]
    slower = evaluate_gate(GOOD, GateThresholds(max_latency_regression_pct=10), ParitySettings(),
                           comparison(candidate_p95=30.0, champion_p95=20.0))
    assert not slower.passed
    assert "+50.0%, max +10%" in slower.failures[0]
    assert slower.metrics()["gate/latency_change_pct"] == 50.0


def test_broken_candidate_is_rejected_against_champion_measured_in_process(default_artifact, broken_artifact):
    references = load_references()
    candidate = Classifier(broken_artifact, device="cpu")
    measured = compare_with_champion(candidate, measure_accuracy(candidate, references).top1, default_artifact, "1",
                                     references, duration_s=0.2, rounds=2)
    assert measured.candidate_accuracy < measured.champion_accuracy
    assert measured.champion_p95_ms > 0 and measured.candidate_p95_ms > 0
    verdict = evaluate_gate(GOOD, GateThresholds(), ParitySettings(), measured)
    assert not verdict.passed
    assert any("accuracy vs champion v1" in f for f in verdict.failures)
