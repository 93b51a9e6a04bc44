"""Simplify an exported artifact with onnxsim; on any failure keep the unsimplified graph.

onnxsim runs in a child process with a time limit: it is C++ underneath and can abort, hang or
exhaust memory on unusual graphs, and none of that may take the release down with it. The
onnxship metadata_props are copied onto the simplified model (onnxsim's own provenance entries are
dropped, apart from a one-line `simplified_by`).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from flows.stages.export import write_model

DEFAULT_TIMEOUT_S = 300.0

# Runs in the child: simplify IN, check it numerically, write OUT, or say why not (stderr, exit 1).
WORKER = r"""
import sys
import onnx, onnxsim
source, target = sys.argv[1], sys.argv[2]
model = onnx.load(source)
simplified, ok = onnxsim.simplify(model, check_n=1)
if not ok:
    sys.exit("onnxsim's numerical check failed: the simplified graph's outputs differ from the original's")
onnx.save_model(simplified, target)
"""


@dataclass(frozen=True)
class SimplifyResult:
    path: Path
    simplified: bool
    nodes_before: int
    nodes_after: int
    seconds: float
    error: str | None  # why the unsimplified graph was kept

    def to_dict(self) -> dict:
        data = asdict(self)
        data["path"] = str(self.path)
        return data


def simplify_onnx(
    path: str | Path, output: str | Path | None = None, timeout_s: float = DEFAULT_TIMEOUT_S
) -> SimplifyResult:
    """Simplify `path` into `output` (default: in place). Never raises for an onnxsim failure."""
    import onnx

    started = time.perf_counter()
    path = Path(path)
    output = Path(output) if output is not None else path
    original = onnx.load(str(path))
    nodes_before = len(original.graph.node)
    props = [(p.key, p.value) for p in original.metadata_props if p.key not in ("simplified_by", "simplify_error")]

    with tempfile.TemporaryDirectory(prefix="onnxship-simplify-") as scratch:
        candidate = Path(scratch) / "simplified.onnx"
        error = run_onnxsim(path, candidate, timeout_s)
        if error is None:
            model = onnx.load(str(candidate))
            version = onnxsim_version()
            entries = [*props, ("simplified_by", f"onnxsim {version}: {nodes_before} -> {len(model.graph.node)} nodes")]
        else:
            model = original
            entries = [*props, ("simplify_error", error[:500])]
        del model.metadata_props[:]
        for key, value in entries:
            model.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
        write_model(model, output)

    return SimplifyResult(
        path=output,
        simplified=error is None,
        nodes_before=nodes_before,
        nodes_after=len(model.graph.node),
        seconds=time.perf_counter() - started,
        error=error,
    )


def run_onnxsim(source: Path, target: Path, timeout_s: float) -> str | None:
    """Run onnxsim in a child process; None on success, else one line saying why it failed."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    try:
        done = subprocess.run(
            [sys.executable, "-c", WORKER, str(source), str(target)],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            env=env,
        )
    except subprocess.TimeoutExpired:
        return f"onnxsim did not finish within {timeout_s:g} s"
    if done.returncode != 0 or not target.is_file():
        lines = [line.strip() for line in done.stderr.splitlines() if line.strip()]
        reason = lines[-1][:300] if lines else f"exit status {done.returncode}"
        if done.returncode < 0:
            reason = f"onnxsim crashed (signal {-done.returncode}); {reason}"
        return f"onnxsim failed: {reason}"
    return None


def onnxsim_version() -> str:
    try:
        from importlib.metadata import version

        return version("onnxsim")
    except Exception:
        return "unknown"
