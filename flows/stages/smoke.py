"""Smoke test a deployed endpoint: health, readiness, expected classes, latency budget.

`run_smoke_test` is a plain function: the release's smoke stage, the scheduled `smoke-test` flow
(flows/smoke.py) and rollback call it. It never raises for an endpoint problem; it returns a
`SmokeResult` whose `failures` say what is wrong.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from serving.client import ClassifierClient

DEFAULT_MIN_ACCURACY = 0.75  # = the gate's default: the bundled model gets 3/4 reference images right


class SmokeTestFailed(RuntimeError):
    """The deployed endpoint is unhealthy or answers wrongly; the message lists every failure."""


@dataclass
class SmokeCheck:
    image: str
    expected_class: int | None
    class_id: int | None = None
    label: str = ""
    confidence: float | None = None
    latency_s: float | None = None
    ok: bool = False
    error: str = ""
    wrong_class_only: bool = False  # answered in time, but not the expected class


SMOKE_METRIC_KEYS = ("smoke/passed", "smoke/images_count", "smoke/failures_count", "smoke/top1_accuracy",
                     "smoke/latency_max_ms", "smoke/latency_p50_ms")


@dataclass
class SmokeResult:
    url: str
    passed: bool
    healthy: bool
    ready: bool
    checks: list[SmokeCheck] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    latency_budget_s: float = 0.0
    min_accuracy: float = 1.0
    correct: int = 0
    labelled: int = 0
    seconds: float = 0.0

    @property
    def latencies(self) -> list[float]:
        return [c.latency_s for c in self.checks if c.latency_s is not None]

    def metrics(self) -> dict[str, float]:
        """Always the keys of SMOKE_METRIC_KEYS (NaN where nothing was measured), so MLflow's
        Compare lines releases up whether or not their smoke test got to answer."""
        lat = sorted(self.latencies)
        return dict(zip(SMOKE_METRIC_KEYS, (
            1.0 if self.passed else 0.0,
            float(len(self.checks)),
            float(len(self.failures)),
            self.correct / self.labelled if self.labelled else 1.0,
            round(lat[-1] * 1000, 1) if lat else math.nan,
            round(lat[len(lat) // 2] * 1000, 1) if lat else math.nan,
        )))

    def to_dict(self) -> dict:
        return {**asdict(self), "metrics": self.metrics()}

    def markdown(self) -> str:
        head = "PASSED" if self.passed else "FAILED"
        lines = [f"## Smoke test {head}: `{self.url}`", "",
                 f"health: {'ok' if self.healthy else 'DOWN'} · ready: {'yes' if self.ready else 'NO'} · "
                 f"expected classes {self.correct}/{self.labelled} (min {self.min_accuracy:.0%}) · "
                 f"latency budget {self.latency_budget_s:g} s per image", ""]
        if self.failures:
            lines += ["**Failures**", ""] + [f"- {f}" for f in self.failures] + [""]
        if self.checks:
            lines += ["| image | expected | got | confidence | latency | ok |", "|---|---|---|---|---|---|"]
            for c in self.checks:
                got = f"{c.class_id} {c.label}" if c.class_id is not None else (c.error or "-")
                conf = f"{c.confidence:.3f}" if c.confidence is not None else "-"
                lat = f"{c.latency_s * 1000:.0f} ms" if c.latency_s is not None else "-"
                exp = "-" if c.expected_class is None else str(c.expected_class)
                lines.append(f"| {c.image} | {exp} | {got} | {conf} | {lat} | {'yes' if c.ok else 'NO'} |")
        return "\n".join(lines) + "\n"


def run_smoke_test(
    url: str,
    api_key: str | None,
    references: Sequence,
    latency_budget_s: float,
    gateway_token: str | None = None,
    timeout_s: float = 30.0,
    min_accuracy: float = DEFAULT_MIN_ACCURACY,
) -> SmokeResult:
    """Check the endpoint with the reference images; never raises for endpoint problems (see `.failures`).

    Every image must get an answer within the latency budget; of the images with an expected
    class, at least `min_accuracy` must match (the release passes the classes its validated
    artifact gave in-process, with min_accuracy=1.0: the endpoint must serve exactly that model).
    """
    started = time.perf_counter()
    # a busy endpoint's 503 (or a 504, a dropped connection) is retried as the server's failure model says:
    # the smoke test judges the model and the deployment, not one burst of load
    client = ClassifierClient(url, api_key=api_key, timeout=timeout_s, gateway_token=gateway_token, retries=2)
    result = SmokeResult(url=url, passed=False, healthy=False, ready=False, latency_budget_s=latency_budget_s,
                         min_accuracy=min_accuracy)
    try:
        client.health()
        result.healthy = True
    except Exception as error:
        result.failures.append(f"health: cannot reach {url}/health: {error}")
    if result.healthy:
        try:
            result.ready = bool(client.ready())
        except Exception as error:
            result.failures.append(f"ready: {error}")
        if not result.ready and not any(f.startswith("ready") for f in result.failures):
            result.failures.append(f"ready: {url}/ready says the model is not loaded")
    if result.healthy:
        for ref in references:
            result.checks.append(check_image(client, ref, latency_budget_s))
        result.failures += [f"{c.image}: {c.error}" for c in result.checks if not c.ok and not c.wrong_class_only]
        labelled = [c for c in result.checks if c.expected_class is not None and c.class_id is not None]
        result.labelled = len([c for c in result.checks if c.expected_class is not None])
        result.correct = sum(1 for c in labelled if c.class_id == c.expected_class)
        if result.labelled and result.correct / result.labelled < min_accuracy - 1e-9:
            wrong = [f"{c.image}: {c.error}" for c in result.checks if c.wrong_class_only]
            result.failures.append(
                f"expected classes: {result.correct}/{result.labelled} correct, below the minimum of "
                f"{min_accuracy:.0%}" + (" (" + "; ".join(wrong) + ")" if wrong else "")
            )
    if not references:
        result.failures.append("no reference images to send")
    result.passed = not result.failures
    result.seconds = round(time.perf_counter() - started, 3)
    return result


def check_image(client, ref, latency_budget_s: float) -> SmokeCheck:
    check = SmokeCheck(image=Path(ref.path).name, expected_class=ref.expected_class)
    try:
        prediction = client.predict(Path(ref.path))
    except Exception as error:
        check.error = f"request failed: {error}"
        return check
    check.class_id, check.label = int(prediction.class_id), prediction.label
    check.confidence, check.latency_s = float(prediction.confidence), float(prediction.latency)
    problems = []
    wrong_class = ref.expected_class is not None and check.class_id != ref.expected_class
    if wrong_class:
        problems.append(f"expected class {ref.expected_class} ({ref.label}), got {check.class_id} ({check.label})")
    if check.latency_s > latency_budget_s:
        problems.append(f"latency {check.latency_s * 1000:.0f} ms over the budget of {latency_budget_s * 1000:.0f} ms")
    check.error = "; ".join(problems)
    check.ok = not problems
    check.wrong_class_only = wrong_class and len(problems) == 1
    return check
