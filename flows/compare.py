"""Compare two registered versions side by side: their release runs' parameters and figures.

    python -m flows.compare                      # @champion vs @previous
    python -m flows.compare 3 5                  # versions (or aliases: champion, previous, candidate)
    python -m flows.compare --model-name NAME --tracking-uri URI

Prints the parameters that differ and every metric both runs have, grouped by stage, with the
change, then the `mlflow ui` link that shows the same comparison.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from urllib.parse import quote

from flows import registry
from flows.params import DEFAULT_MODEL_NAME


class CompareError(ValueError):
    """A version to compare cannot be found; the message says which and what exists."""


@dataclass(frozen=True)
class Side:
    label: str  # "v3 @champion"
    version: str
    run_id: str
    experiment_id: str
    params: dict[str, str]
    metrics: dict[str, float]


def resolve_version(client, name: str, ref: str) -> str:
    """A version number, or the version an alias points at."""
    if ref.isdigit():
        return ref
    version = registry.alias_version(client, name, ref.removeprefix("@"))
    if version is None:
        known = ", ".join(f"@{a} = v{v}" for a, v in sorted(registry.aliases(client, name).items())) or "none"
        raise CompareError(f"model {name!r} has no alias {ref!r} (aliases: {known})")
    return version


def load_side(client, name: str, ref: str) -> Side:
    from mlflow.exceptions import MlflowException

    version = resolve_version(client, name, ref)
    try:
        model_version = client.get_model_version(name, version)
        run = client.get_run(model_version.run_id)
    except MlflowException as error:
        raise CompareError(f"models:/{name}/{version}: {error.message}") from None
    aliases = " ".join(f"@{a}" for a in sorted(model_version.aliases or []))
    return Side(label=f"v{version} {aliases}".strip(), version=version, run_id=run.info.run_id,
                experiment_id=run.info.experiment_id, params=dict(run.data.params), metrics=dict(run.data.metrics))


def compare_link(client, a: Side, b: Side) -> str:
    """The `mlflow ui` page that compares the two runs."""
    base = registry.run_link(client, a.experiment_id, a.run_id).split("/#/")[0]
    runs = quote(json.dumps([a.run_id, b.run_id], separators=(",", ":")))
    experiments = quote(json.dumps(sorted({a.experiment_id, b.experiment_id}), separators=(",", ":")))
    return f"{base}/#/compare-runs?runs={runs}&experiments={experiments}&{registry.UI_MODE}"


def change(a: float, b: float) -> str:
    if any(math.isnan(v) for v in (a, b)):
        return ""
    if a == 0:
        return "" if b == 0 else "new"
    return f"{(b - a) / abs(a):+.1%}"


def render(a: Side, b: Side, link: str, ui_command: str) -> str:
    width = max([len(k) for k in {**a.metrics, **b.metrics, **a.params}] + [24]) + 2
    lines = [f"{'':{width}}{a.label:>16}{b.label:>16}{'change':>10}"]
    differing = sorted(k for k in {**a.params, **b.params} if a.params.get(k) != b.params.get(k))
    if differing:
        lines.append("parameters that differ")
        lines += [f"  {k:{width - 2}}{str(a.params.get(k, '-'))[:15]:>16}{str(b.params.get(k, '-'))[:15]:>16}"
                  for k in differing]
    group = None
    for key in sorted(set(a.metrics) & set(b.metrics)):
        prefix = key.split("/")[0] if "/" in key else "other"
        if prefix != group:
            group = prefix
            lines.append(group)
        lines.append(f"  {key:{width - 2}}{a.metrics[key]:>16.4g}{b.metrics[key]:>16.4g}{change(a.metrics[key], b.metrics[key]):>10}")
    lines += ["", f"the same in MLflow: {ui_command}", f"  then open {link}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("a", nargs="?", default="champion", help="version or alias (default champion)")
    parser.add_argument("b", nargs="?", default="previous", help="version or alias (default previous)")
    parser.add_argument("--model-name", default=DEFAULT_MODEL_NAME)
    parser.add_argument("--tracking-uri", default=None, help="MLflow store (default: MLFLOW_TRACKING_URI or mlruns/)")
    args = parser.parse_args(argv)
    client = registry.connect(args.tracking_uri)
    try:
        a, b = load_side(client, args.model_name, args.a), load_side(client, args.model_name, args.b)
    except CompareError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(render(a, b, compare_link(client, a, b), registry.ui_command(client.tracking_uri)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
