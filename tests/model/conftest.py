"""Fixtures of the model area."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture
def read_only_dir(tmp_path) -> Path:
    """A directory this process cannot write: chmod 555, or /sys when running as root."""
    if os.geteuid() != 0:
        directory = tmp_path / "read-only"
        directory.mkdir()
        directory.chmod(0o555)
        yield directory
        directory.chmod(0o755)
        return
    probe = Path("/sys/.onnxship-write-probe")
    try:
        probe.touch()
    except OSError:
        yield Path("/sys")  # root cannot create files in sysfs
        return
    probe.unlink()
    pytest.skip("running as root and /sys is writable: no read-only directory to test with")
