"""mypy over the whole package, as pyproject's `[tool.mypy]` says: function bodies checked
everywhere, and --strict's flags for the vocabulary and the pure policy cores. It runs on a
copy in the installed layout (mypy finds `agentpool.actors` by walking folders, as the wheel
holds it), in its own process and with a fresh cache."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from bench.layout import stage


def test_the_package_type_checks(tmp_path: Path) -> None:
    staged = stage(tmp_path / "installed", also=("pyproject.toml",))
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "-p", "agentpool", "--cache-dir", str(tmp_path / "cache")],
        cwd=staged,
        env={**os.environ, "PYTHONPATH": str(staged)},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    assert "no issues found" in done.stdout
