"""serving/ is what ships in the GPU image: it must run without torch, Prefect, MLflow or flows/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FORBIDDEN = ("torch", "prefect", "mlflow", "flows", "onnx", "onnxsim")


def test_serving_modules_import_nothing_from_the_pipeline():
    modules = sorted(f"serving.{p.stem}" for p in (REPO / "serving").glob("*.py") if p.stem != "__main__")
    probe = (
        "import importlib, sys\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        f"print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r})))\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"serving/ pulled in pipeline packages: {result.stdout.strip()}"


def test_server_requirements_leave_out_the_pipeline():
    lines = (REPO / "requirements" / "serving.txt").read_text().splitlines()
    names = {line.split("==")[0].strip().lower() for line in lines if line.strip() and not line.startswith("#")}
    assert not names & {"torch", "prefect", "mlflow", "onnx", "onnxsim", "onnxruntime-gpu"}, names
    assert "onnxruntime" in names and "litserve" in names


def test_litserve_internals_are_used_in_one_module_only():
    import re

    for path in sorted((REPO / "serving").glob("*.py")):
        if path.name == "litserve_bridge.py":
            continue
        text = path.read_text()
        private = re.findall(r"^\s*(?:from litserve\.\S+ import .*|import litserve\.\S+.*)$|ls\._\w+", text, re.M)
        assert not private, f"{path.name} uses LitServe beyond its public API: {private} (move it into litserve_bridge.py)"
