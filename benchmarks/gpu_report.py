"""The tables of scripts/gpu_check.sh: one markdown and one JSON file from what its runs left.

    python -m benchmarks.gpu_report OUT_DIR      # reads OUT_DIR/plan.tsv, cold/*.json, bench/*.json,
                                                 # host-overhead.json

plan.tsv, one line per configuration: label, model file, expected provider, server flags. For every
configuration bench/<label>.json is a `benchmarks.bench --only b --json` report (its server start is
the warm one); TensorRT configurations also have cold/<label>.json, the GET /model of a start with
an empty engine cache. host-overhead.json is a `benchmarks.bench --null --json` report (the null
twin served with the CUDA defaults, against decoding in-process). Exit status 1 when a
configuration is missing or not on its provider.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def ready_after(info: dict | None) -> float | None:
    return ((info or {}).get("startup") or {}).get("ready_after_s")


def engines_before(info: dict | None) -> int | None:
    """Engines in the TensorRT cache when the (first) worker's session opened."""
    caches = (info or {}).get("tensorrt_cache") or [w["tensorrt_cache"] for w in (info or {}).get("workers", [])
                                                    if "tensorrt_cache" in w]
    return caches[0].get("engines_before") if caches else None


def configuration(out: Path, label: str, model: str, provider: str, flags: str) -> dict:
    bench, cold = load(out / "bench" / f"{label}.json"), load(out / "cold" / f"{label}.json")
    served = (bench or {}).get("models", {}).get("b")
    row = {"label": label, "model": Path(model).name, "flags": flags, "expected_provider": provider,
           "providers": (served or {}).get("providers"), "warm_ready_s": ready_after(served),
           "cold_ready_s": ready_after(cold), "engines_before_cold": engines_before(cold),
           "engines_before_warm": engines_before(served), "levels": []}
    if cold is not None and cold.get("providers") and provider not in cold["providers"]:
        row["providers"] = cold["providers"]
    for level in (bench or {}).get("levels", []):
        row["levels"].append({k: level.get(k) for k in ("concurrency", "img_s", "p50_ms", "p99_ms", "errors")})
    if bench is None:
        row["problem"] = "no benchmark result (see logs/)"
    elif provider not in (row["providers"] or []):
        row["problem"] = f"{provider} not active: /model reports {row['providers']}"
    elif provider.startswith("Tensorrt") and row["cold_ready_s"] is None:
        row["problem"] = "no cold start measured (see logs/)"
    elif provider.startswith("Tensorrt") and not row["engines_before_warm"]:
        row["problem"] = "the second start found no engine in the TensorRT cache: it built them again"
    return row


def host_overhead(report: dict | None) -> dict | None:
    """What the null-model run says about this machine's CPUs as a GPU replica's host."""
    if report is None:
        return None
    summary = report.get("summary", {}).get("b", {})
    return {"ceiling_img_s": summary.get("ceiling_img_s"), "best_img_s": summary.get("best_img_s"),
            "best_concurrency": summary.get("best_concurrency"), "vs_ceiling": summary.get("vs_ceiling"),
            "lone_added_ms": summary.get("lone_added_ms"), "cpu_ms_per_image": summary.get("cpu_split_ms")}


def host_markdown(host: dict | None) -> list[str]:
    if host is None:
        return ["Host overhead: no result (see logs/host-overhead.log).", ""]
    split = host["cpu_ms_per_image"] or {}
    return ["Host overhead (the model's null twin, CUDA defaults; the CPUs decide what a replica can serve):", "",
            "| in-process ceiling img/s | server best img/s | at conc. | / ceiling | lone client added ms | "
            "CPU ms/img decode | HTTP | hand-off |", "|---:|---:|---:|---:|---:|---:|---:|---:|",
            f"| {host['ceiling_img_s']} | {host['best_img_s']} | {host['best_concurrency']} | {host['vs_ceiling']} | "
            f"{host['lone_added_ms']} | {split.get('decode', '')} | {split.get('http', '')} | "
            f"{split.get('handoff', '')} |", ""]


def markdown(rows: list[dict], header: str, host: dict | None = None) -> str:
    lines = [f"# GPU check\n\n{header}\n", "| configuration | model | provider (/model) | conc. | img/s | p50 ms | "
             "p99 ms | errors |", "|---|---|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        provider = row["expected_provider"].replace("ExecutionProvider", "") + (" FAIL" if "problem" in row else " OK")
        for level in row["levels"] or [{}]:
            lines.append(f"| {row['label']} | {row['model']} | {provider} | {level.get('concurrency', '')} | "
                         f"{level.get('img_s', '')} | {level.get('p50_ms', '')} | {level.get('p99_ms', '')} | "
                         f"{level.get('errors', '')} |")
    lines += ["", "| configuration | time to ready (s) | with an empty TensorRT cache (s) | engine build (s) | "
              "engines cached before the cold / warm start |", "|---|---:|---:|---:|---|"]
    for row in rows:
        cold, warm = row["cold_ready_s"], row["warm_ready_s"]
        build = round(cold - warm, 2) if cold is not None and warm is not None else ""
        cached = "" if cold is None else f"{row['engines_before_cold']} / {row['engines_before_warm']}"
        lines.append(f"| {row['label']} | {'' if warm is None else warm} | {'' if cold is None else cold} | {build} | "
                     f"{cached} |")
    problems = [f"- {row['label']}: {row['problem']}" for row in rows if "problem" in row]
    lines += ["", "Problems:" if problems else "Every configuration ran on its provider.", *problems, ""]
    lines += host_markdown(host)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    out = Path(args[0])
    header = (out / "machine.txt").read_text().strip() if (out / "machine.txt").exists() else ""
    rows = []
    for line in (out / "plan.tsv").read_text().splitlines():
        if line.strip():
            label, model, provider, flags = (line.split("\t") + ["", "", "", ""])[:4]
            rows.append(configuration(out, label, model, provider, flags))
    host = host_overhead(load(out / "host-overhead.json"))
    (out / "gpu-check.json").write_text(json.dumps({"machine": header, "configurations": rows,
                                                    "host_overhead": host}, indent=2))
    (out / "gpu-check.md").write_text(markdown(rows, header, host))
    print((out / "gpu-check.md").read_text())
    return 1 if any("problem" in row for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
