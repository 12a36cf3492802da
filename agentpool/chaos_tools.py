"""Misbehaving tools, to check a deployment's isolation (`tool_modules=["agentpool.chaos_tools"]`).

They run in their own executor group, `chaos`, as a badly behaved dependency should: a tool
that hangs or kills its process then exhausts only that group's executors. Used by the
tests and by `python -m bench tools`; never load them where real agents could call them.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from agentpool.tools import tool

GROUP = "chaos"
_attempts: dict[str, int] = {}


@tool(group=GROUP, timeout_s=0.5)
def hang_sync(seconds: float = 3600.0) -> str:
    """Blocks its thread far past its timeout, ignoring it."""
    time.sleep(seconds)
    return "woke up"


@tool(group=GROUP, timeout_s=0.5)
async def hang_async(seconds: float = 3600.0) -> str:
    """Sleeps far past its timeout (cancellation stops it)."""
    await asyncio.sleep(seconds)
    return "woke up"


@tool(group=GROUP, timeout_s=5.0)
def crash_process(code: int = 1) -> str:
    """Kills the process it runs in, as a segfault would."""
    os._exit(code)


@tool(group=GROUP, timeout_s=0.5, isolation="process")
def spin(seconds: float = 3600.0) -> str:
    """Burns a CPU far past its timeout, as a runaway loop in C would (process isolation kills it)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass
    return "done spinning"


@tool(group=GROUP, timeout_s=5.0, isolation="process")
def segfault() -> str:
    """Dereferences a null pointer: the process it runs in dies of SIGSEGV."""
    import ctypes

    ctypes.string_at(0)
    return "unreachable"


@tool(group=GROUP, timeout_s=5.0, idempotent=True)
async def chaos_echo(text: str, delay_s: float = 0.0) -> str:
    """Returns its text, after an optional delay; safe to run twice."""
    await asyncio.sleep(delay_s)
    return text


@tool(group=GROUP, timeout_s=5.0, idempotent=True, retries=3)
def flaky(key: str, failures: int = 2) -> str:
    """Fails with a transient error the first `failures` times it is called with `key` (per process)."""
    seen = _attempts.get(key, 0)
    _attempts[key] = seen + 1
    if seen < failures:
        raise ConnectionError(f"transient failure {seen + 1} of {failures}")
    return f"ok after {seen} failures"


@tool(group=GROUP, timeout_s=5.0)
def append_line(path: str, line: str) -> str:
    """Appends a line to a file: a side effect that must not happen twice."""
    with Path(path).open("a") as fh:
        fh.write(line + "\n")
    return "appended"


@tool(group=GROUP, timeout_s=5.0)
def append_line_once(path: str, line: str, idempotency_key: str) -> str:
    """Appends a line to a file once per idempotency key, as a payment API would."""
    target = Path(path)
    if target.exists() and any(row.startswith(idempotency_key + " ") for row in target.read_text().splitlines()):
        return "already appended"
    with target.open("a") as fh:
        fh.write(f"{idempotency_key} {line}\n")
    return "appended"


@tool(group=GROUP, timeout_s=5.0, idempotent=True, cache_ttl_s=60)
def count_runs(path: str) -> str:
    """Appends to a file each time it really runs and returns how many times it has: cacheable."""
    with Path(path).open("a") as fh:
        fh.write("run\n")
    return str(len(Path(path).read_text().splitlines()))


@tool(group=GROUP, timeout_s=5.0, max_concurrency=1)
async def one_at_a_time(delay_s: float = 1.0) -> str:
    """Sleeps; at most one call runs at once in an executor."""
    await asyncio.sleep(delay_s)
    return "done"
