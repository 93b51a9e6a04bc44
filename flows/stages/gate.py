"""The validation gate: thresholds, plus no regression against the current champion.

The champion's figures are measured here, in the same process and the same run as the
candidate's (same images, same machine, interleaved latency rounds), never read back from an old
run that ran on another machine or under another load.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from flows.params import GateThresholds, ParitySettings, VariantBudget
from flows.stages.accuracy import measure_accuracy, open_classifier
from flows.stages.benchmark import compare_latency
from serving.runtime import Classifier

PASS, FAIL = "pass", "fail"


@dataclass(frozen=True)
class CandidateFigures:
    top1_agreement: float  # PyTorch vs ONNX on the reference images
    max_prob_diff: float
    accuracy: float  # top-1 on reference images with an expected class
    accuracy_correct: int
    accuracy_total: int
    p95_ms: float  # ORT batch 1, decode included


@dataclass(frozen=True)
class ChampionComparison:
    champion_version: str
    champion_accuracy: float
    candidate_accuracy: float
    champion_p95_ms: float
    candidate_p95_ms: float
    paired_ratio: float | None = None  # median of candidate/champion p95 over back-to-back pairs of rounds

    @property
    def latency_change_pct(self) -> float:
        if self.paired_ratio is not None:
            return 100.0 * (self.paired_ratio - 1.0)
        if self.champion_p95_ms <= 0:
            return 0.0
        return 100.0 * (self.candidate_p95_ms - self.champion_p95_ms) / self.champion_p95_ms


@dataclass
class GateVerdict:
    passed: bool
    reasons: list[str] = field(default_factory=list)  # one line per check, "ok: ..." or "FAIL: ..."
    comparison: ChampionComparison | None = None

    @property
    def verdict(self) -> str:
        return PASS if self.passed else FAIL

    @property
    def failures(self) -> list[str]:
        return [r for r in self.reasons if r.startswith("FAIL")]

    def summary(self) -> str:
        head = "PASS" if self.passed else "FAIL"
        return f"{head}: " + ("; ".join(self.failures) if self.failures else "all checks passed")

    def tags(self) -> dict[str, str]:
        tags = {"gate.verdict": self.verdict, "gate.reasons": "\n".join(self.reasons)}
        if self.comparison:
            tags["gate.compared_with"] = self.comparison.champion_version
        return tags

    def metrics(self) -> dict[str, float]:
        """Same keys on every release (NaN when there was no champion to compare with)."""
        c = self.comparison
        nan = float("nan")
        return {
            "gate/passed": 1.0 if self.passed else 0.0,
            "gate/champion_top1_accuracy": c.champion_accuracy if c else nan,
            "gate/champion_p95_ms": c.champion_p95_ms if c else nan,
            "gate/candidate_p95_ms": c.candidate_p95_ms if c else nan,
            "gate/latency_change_pct": round(c.latency_change_pct, 2) if c else nan,
        }

    def to_dict(self) -> dict:
        return {"passed": self.passed, "verdict": self.verdict, "reasons": self.reasons,
                "comparison": asdict(self.comparison) if self.comparison else None}


def check(ok: bool, text: str) -> str:
    return ("ok: " if ok else "FAIL: ") + text


def evaluate_gate(
    figures: CandidateFigures,
    thresholds: GateThresholds,
    parity: ParitySettings,
    comparison: ChampionComparison | None = None,
) -> GateVerdict:
    """Apply every threshold; the reasons read as a checklist, failures first."""
    reasons = [
        check(figures.top1_agreement >= parity.min_top1_agreement,
              f"parity top-1 agreement {figures.top1_agreement:.1%} (min {parity.min_top1_agreement:.1%})"),
        check(figures.max_prob_diff <= parity.max_prob_diff,
              f"parity max prob diff {figures.max_prob_diff:.2e} (max {parity.max_prob_diff:.0e})"),
        check(figures.accuracy >= thresholds.min_accuracy,
              f"reference accuracy {figures.accuracy_correct}/{figures.accuracy_total} = {figures.accuracy:.1%} "
              f"(min {thresholds.min_accuracy:.1%})"),
        check(figures.p95_ms <= thresholds.max_p95_latency_ms,
              f"p95 latency {figures.p95_ms:.1f} ms, batch 1, decode included (max {thresholds.max_p95_latency_ms:g} ms)"),
    ]
    if comparison is None:
        reasons.append("ok: no champion yet: nothing to regress against")
    else:
        drop = comparison.champion_accuracy - comparison.candidate_accuracy
        reasons.append(check(
            drop <= thresholds.max_accuracy_drop + 1e-9,
            f"accuracy vs champion v{comparison.champion_version}: {comparison.candidate_accuracy:.1%} vs "
            f"{comparison.champion_accuracy:.1%} (max drop {thresholds.max_accuracy_drop:.1%})",
        ))
        change = comparison.latency_change_pct
        judged_on = ("change: median of the paired rounds" if comparison.paired_ratio is not None
                     else "change")  # pairs can disagree with the overall p95s when other programs load the CPU
        reasons.append(check(
            change <= thresholds.max_latency_regression_pct,
            f"p95 vs champion v{comparison.champion_version}, same run: {comparison.candidate_p95_ms:.1f} ms vs "
            f"{comparison.champion_p95_ms:.1f} ms ({judged_on} {change:+.1f}%, "
            f"max +{thresholds.max_latency_regression_pct:g}%)",
        ))
    reasons.sort(key=lambda r: not r.startswith("FAIL"))
    return GateVerdict(passed=not any(r.startswith("FAIL") for r in reasons), reasons=reasons, comparison=comparison)


def compare_with_champion(
    candidate: Classifier,
    candidate_accuracy: float,
    champion_path: Path,
    champion_version: str,
    references: Sequence,
    duration_s: float = 1.0,
    rounds: int = 6,
) -> ChampionComparison:
    """Measure the champion beside the candidate's session: accuracy on the same references (the
    candidate's was measured by the parity stage on the same file), interleaved p95."""
    champion = open_classifier(champion_path, like=candidate)
    champion_accuracy = measure_accuracy(champion, references).top1
    images = [ref.path for ref in references]
    candidate_p95, champion_p95, ratio = compare_latency(candidate, champion, images, batch_size=1,
                                                         duration_s=duration_s, rounds=rounds)
    return ChampionComparison(
        champion_version=str(champion_version),
        champion_accuracy=champion_accuracy,
        candidate_accuracy=candidate_accuracy,
        champion_p95_ms=champion_p95,
        candidate_p95_ms=candidate_p95,
        paired_ratio=ratio,
    )


# ---------------------------------------------------------------- which precision ships


@dataclass
class VariantChoice:
    chosen: str
    device: str
    decisions: dict[str, list[str]] = field(default_factory=dict)  # precision -> "ok: ..." / "FAIL: ..." lines
    verdicts: dict[str, str] = field(default_factory=dict)  # precision -> baseline | chosen | eligible | refused

    def why(self, precision: str) -> str:
        """The failures that refused a variant, else the checks it passed ("" for the baseline)."""
        reasons = self.decisions.get(precision, [])
        failures = [r[6:] for r in reasons if r.startswith("FAIL")]
        return "; ".join(failures) if failures else "; ".join(r.removeprefix("ok: ") for r in reasons)

    def lines(self) -> list[str]:
        """One line per variant: its verdict and the reason."""
        return [f"{precision}: {verdict}" + (f" ({self.why(precision)})" if self.why(precision) else "")
                for precision, verdict in self.verdicts.items()]

    def to_dict(self) -> dict:
        return {"chosen": self.chosen, "device": self.device, "verdicts": self.verdicts, "decisions": self.decisions}


def choose_variant(variants: Sequence, budget: VariantBudget, device: str) -> VariantChoice:
    """The fastest variant for the target's device that keeps the model's answers; fp32 otherwise.

    CPU targets: speed is measured here (batch 1 against fp32, `speedup`), so a variant must be
    at least `min_speedup` times faster (fp16 is slower on CPUs: never taken there). cuda targets: the
    release measures on this machine's CPU, so the GPU speed of fp16 is not measured; fp16 is taken on
    its agreement alone (half the bytes and tensor cores on every CUDA GPU we deploy to) and the serving
    benchmark measures it on a GPU; int8 is taken for CPU targets only."""
    fp32 = variants[0]
    choice = VariantChoice(chosen=fp32.precision, device=device, verdicts={fp32.precision: "baseline"})
    speeds = {fp32.precision: 1.0}
    for variant in variants[1:]:
        reasons = judge_variant(variant, fp32, budget, device)
        choice.decisions[variant.precision] = reasons
        if any(r.startswith("FAIL") for r in reasons):
            choice.verdicts[variant.precision] = "refused"
        else:
            choice.verdicts[variant.precision] = "eligible"
            speeds[variant.precision] = variant.speedup if variant.speedup is not None else 1.0 + 1e-6
    choice.chosen = max(speeds, key=speeds.get)
    if choice.chosen != fp32.precision:
        choice.verdicts[choice.chosen] = "chosen"
    else:
        choice.verdicts[fp32.precision] = "chosen (baseline)"
    return choice


def judge_variant(variant, fp32, budget: VariantBudget, device: str) -> list[str]:
    if variant.refused is not None or variant.agreement is None:
        return [f"FAIL: {variant.refused or 'not evaluated'}"]
    a, base = variant.agreement, fp32.agreement
    reasons = [
        check(a.images >= budget.min_eval_images, f"{a.images} evaluation images (min {budget.min_eval_images})"),
        check(a.top1_agreement >= budget.min_top1_agreement,
              f"top-1 agreement with PyTorch {a.top1_agreement:.1%} (min {budget.min_top1_agreement:.1%})"),
    ]
    if a.labelled and base.labelled:
        drop = base.accuracy - a.accuracy
        reasons.append(check(drop <= budget.max_accuracy_drop + 1e-9,
                             f"top-1 accuracy {a.correct}/{a.labelled} = {a.accuracy:.1%} vs fp32 {base.accuracy:.1%} "
                             f"(drop {100 * drop:.1f} points, max {100 * budget.max_accuracy_drop:.1f})"))
    else:
        reasons.append("ok: no labelled evaluation images: accuracy not judged, agreement only")
    if device == "cpu":
        if variant.speedup is None:
            reasons.append("FAIL: speed not measured")
        else:
            reasons.append(check(variant.speedup >= budget.min_speedup,
                                 f"{variant.speedup:.2f}x fp32's speed at batch 1 on this CPU (min {budget.min_speedup:.2f}x)"))
    elif variant.precision == "fp16":
        reasons.append("ok: GPU speed not measured here (the release benchmarks on CPU): taken on agreement, "
                       "measured by the serving benchmark on a GPU")
    else:
        reasons.append(f"FAIL: {variant.precision} is taken for CPU targets only (this target runs on {device})")
    return reasons
