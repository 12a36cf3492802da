"""Runs a scenario module in a subprocess (one process holds one Ray: a scenario with a
cluster of its own cannot share the suite's) and returns the JSON report on its last line.

Scenarios spend most of their time waiting on clusters of their own, so the suite starts
them early: a test module lists its runs in `SCENARIOS` (with `REDIS` for the session's
Redis URL), `conftest.py` hands every selected module's list to `start_in_background`, and
they run one at a time in a background thread while the rest of the suite runs;
`run_scenario` then waits for the one asked for (or runs it there and then if it was not
started). `AGENTPOOL_TEST_SCENARIOS_INLINE=1` turns the background runs off.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import redis

ROOT = Path(__file__).resolve().parent.parent
#: In a module's `SCENARIOS`, stands for the session's Redis URL.
REDIS = "{redis_url}"

_started: dict[tuple[str, ...], Future[dict[str, Any]]] = {}
_lock = threading.Lock()


def token_auth_env() -> dict[str, str]:
    """The environment of a process that starts a Ray cluster of its own with token
    authentication on (the pool refuses a cluster without), the token made if missing."""
    if not os.environ.get("RAY_AUTH_TOKEN") and not (Path.home() / ".ray" / "auth_token").exists():
        ray = Path(sys.executable).parent / "ray"
        subprocess.run([str(ray), "get-auth-token", "--generate"], capture_output=True, check=True)
    return {**os.environ, "RAY_AUTH_MODE": "token"}


def start_in_background(runs: list[tuple[str, ...]], redis_url: str, timeout_s: float = 600) -> None:
    """Starts these scenario runs (module, then its arguments), one after the other, in a
    background thread; each run's report waits for `run_scenario` with the same arguments."""
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="scenarios")
    with _lock:
        for run in runs:
            call = tuple(redis_url if a == REDIS else a for a in run)
            if call not in _started:
                _started[call] = executor.submit(_run, call[0], call[1:], timeout_s)
    executor.shutdown(wait=False)


def cancel_background() -> None:
    """Drops the background runs not yet begun (the one running ends by itself)."""
    with _lock:
        for future in _started.values():
            future.cancel()
        _started.clear()


def run_scenario(module: str, *args: str, timeout_s: float = 400) -> dict[str, Any]:
    with _lock:
        started = _started.pop((module, *args), None)
    if started is not None:
        return started.result()
    return _run(module, args, timeout_s)


def _run(module: str, args: tuple[str, ...], timeout_s: float) -> dict[str, Any]:
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


def record_counts(url: str, prefix: str, tenant: str) -> dict[str, int]:
    """How many final records each task has in the tenant's results stream (a scenario's
    check for lost and duplicated tasks)."""
    client = redis.Redis.from_url(url, decode_responses=True)
    counts: dict[str, int] = {}
    for _, fields in client.xrange(f"{prefix}:{{{tenant}}}:results"):
        counts[fields["task_id"]] = counts.get(fields["task_id"], 0) + 1
    client.close()
    return counts
