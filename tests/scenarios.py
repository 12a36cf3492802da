"""Runs a scenario module in a subprocess (one process holds one Ray: a scenario with a
cluster of its own cannot share the suite's) and returns the JSON report on its last line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def token_auth_env() -> dict[str, str]:
    """The environment of a process that starts a Ray cluster of its own with token
    authentication on (the pool refuses a cluster without), the token made if missing."""
    if not os.environ.get("RAY_AUTH_TOKEN") and not (Path.home() / ".ray" / "auth_token").exists():
        ray = Path(sys.executable).parent / "ray"
        subprocess.run([str(ray), "get-auth-token", "--generate"], capture_output=True, check=True)
    return {**os.environ, "RAY_AUTH_MODE": "token"}


def run_scenario(module: str, *args: str, timeout_s: float = 400) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", module, *args],
        env=token_auth_env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    report: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return report
