"""Process isolation without Ray: the real zygote, real forked children, real signals."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentpool.actors.tool_runtime import ToolRunner
from agentpool.actors.tool_sandbox import Sandbox
from agentpool.errors import ToolError
from agentpool.protocol import ToolCall
from agentpool.tools import load_tools

MODULES = ["agentpool.chaos_tools"]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as fh:  # a zombie is dead too
        return fh.read().split()[2] != "Z"


@pytest.fixture
def runner() -> Iterator[ToolRunner]:
    """A fresh sandbox per test: its pipes belong to the event loop of the test's `asyncio.run`."""
    tools = load_tools(MODULES)
    runner = ToolRunner(tools, isolation="process", sandbox=Sandbox(MODULES), threads=4, output_max_chars=100_000)
    yield runner
    runner.shutdown()


def _call(name: str, **arguments: object) -> ToolCall:
    return ToolCall(task_id="t", tenant="acme", tool_use_id=f"toolu_{name}", name=name, arguments=arguments)


def _children(pid: int) -> set[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as fh:
        return {int(p) for p in fh.read().split()}


async def _child_running(sandbox: Sandbox, timeout_s: float = 30.0) -> None:
    """Returns once the sandbox's zygote is up and has forked the child of a call."""
    deadline = time.monotonic() + timeout_s
    while sandbox.pid is None or not _children(sandbox.pid):
        assert time.monotonic() < deadline, "no call started in the sandbox in time"
        await asyncio.sleep(0.02)


def test_results_errors_and_async_tools_cross_the_process_boundary(runner: ToolRunner, tmp_path: Path) -> None:
    target = tmp_path / "lines"

    async def scenario() -> list[object]:
        return list(
            await asyncio.gather(
                runner.execute(_call("append_line", path=str(target), line="one")),
                runner.execute(_call("flaky", key="k", failures=1)),
                runner.execute(_call("chaos_echo", text="x" * 50_000, delay_s=0.05)),
                runner.execute(_call("nope")),
            )
        )

    appended, flaky, echo, unknown = asyncio.run(scenario())
    assert (appended.content, appended.is_error) == ("appended", False)
    assert target.read_text() == "one\n"  # the side effect happened, in the child
    # Each call runs in a fresh fork: the tool's in-memory counter never survives, so every
    # retry fails alike (process isolation keeps no state between calls).
    assert flaky.error_kind == "error" and flaky.content == "ConnectionError: transient failure 1 of 1"
    assert flaky.attempts == 4
    assert echo.content == "x" * 50_000 and not echo.is_error
    assert unknown.error_kind == "unknown_tool"


def test_a_crash_or_segfault_costs_only_its_call(runner: ToolRunner) -> None:
    sandbox = runner.sandbox
    assert sandbox is not None

    async def scenario() -> list[object]:
        crash = await runner.execute(_call("crash_process", code=3))
        segv = await runner.execute(_call("segfault"))
        after = await runner.execute(_call("chaos_echo", text="still here"))
        return [crash, segv, after]

    crash, segv, after = asyncio.run(scenario())
    assert crash.error_kind == "crashed" and "exit code 3" in crash.content
    assert segv.error_kind == "crashed" and "SIGSEGV" in segv.content
    assert after.content == "still here"
    assert sandbox.crashes == 0  # the zygote itself never went down


def test_a_call_past_its_timeout_is_killed_not_left_running(runner: ToolRunner) -> None:
    sandbox = runner.sandbox
    assert sandbox is not None and sandbox.pid is not None
    killed_before = sandbox.killed

    async def scenario() -> list[object]:
        started = time.monotonic()
        outcomes = await asyncio.gather(runner.execute(_call("spin")), runner.execute(_call("hang_sync", seconds=60)))
        return [*outcomes, time.monotonic() - started]

    spin, hang, elapsed = asyncio.run(scenario())
    assert spin.error_kind == "timeout" and hang.error_kind == "timeout"
    assert elapsed < 2
    assert sandbox.killed == killed_before + 2
    assert runner.stuck == 0
    deadline = time.monotonic() + 5
    while _children(sandbox.pid) and time.monotonic() < deadline:  # the zygote reaps the killed children
        time.sleep(0.02)
    assert _children(sandbox.pid) == set()


def test_a_dead_sandbox_fails_its_calls_and_is_started_again() -> None:
    sandbox = Sandbox(MODULES)

    async def scenario() -> tuple[object, str]:
        pending = asyncio.ensure_future(sandbox.call("hang_sync", {"seconds": 60}, 30))
        await _child_running(sandbox)
        assert sandbox.pid is not None
        os.kill(sandbox.pid, 9)
        with pytest.raises(ToolError) as lost:
            await pending
        return lost.value, await sandbox.call("chaos_echo", {"text": "again"}, 30)

    try:
        lost, again = asyncio.run(scenario())
    finally:
        sandbox.close()
    assert lost.fields["kind"] == "crashed"  # type: ignore[attr-defined]
    assert again == "again" and sandbox.crashes == 1


def test_the_sandbox_and_its_children_go_when_the_executor_closes_it() -> None:
    sandbox = Sandbox(MODULES)

    async def scenario() -> int:
        pending = asyncio.ensure_future(sandbox.call("hang_sync", {"seconds": 60}, 30))
        await _child_running(sandbox)
        assert sandbox.pid is not None
        (child,) = _children(sandbox.pid)
        sandbox.close()
        pending.cancel()
        return child

    zygote = sandbox.pid
    child = asyncio.run(scenario())
    assert zygote is not None
    deadline = time.monotonic() + 5
    while (_alive(zygote) or _alive(child)) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not _alive(zygote) and not _alive(child)
