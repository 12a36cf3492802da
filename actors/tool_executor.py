"""The tool-executor actor: a separate process where tools run, apart from the agents.

Executors come in groups (`@tool(group=...)`), each group its own set of actors, so a tool
that hangs or crashes exhausts only its group's processes. An executor whose thread pool
holds `max_stuck_threads` threads of sync tools that ignored their timeout stops taking
calls (they go to another executor), lets its running calls finish, and exits; Ray starts
a fresh process in its place (`max_restarts=-1`). Its calls are not retried by Ray
(`max_task_retries=0`): a call that killed its process must not run again by itself.
Tools under process isolation (the group's `isolation`, or the tool's own) run in children
of a sandbox process instead: they are killed at their timeout and crash alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time

import ray
from opentelemetry import trace

from agentpool import heap
from agentpool import telemetry as tm
from agentpool.actors.tool_runtime import ToolRunner
from agentpool.actors.tool_sandbox import Sandbox
from agentpool.cluster.telemetry import Telemetered
from agentpool.config import Isolation
from agentpool.protocol import ToolCall, ToolOutcome
from agentpool.secrets import forget_env_secrets
from agentpool.tools import load_tools
from agentpool.vocabulary import ToolErrorKind

log = logging.getLogger(__name__)

#: How long a draining executor waits for its healthy calls before it exits anyway.
_DRAIN_GRACE_S = 5.0
#: A draining executor exits only after this long without a call arriving.
_QUIET_S = 1.0


def raise_niceness(level: int) -> None:
    """Lowers this process's CPU priority to niceness `level`, if it runs above it. Linux
    keeps a niceness per thread: every thread running now is lowered, and threads started
    later inherit it from theirs. Raising niceness needs no privilege; a failure leaves the
    priority as it was."""
    try:
        threads = [int(tid) for tid in os.listdir("/proc/self/task")]
    except OSError:  # not Linux: the calling process
        threads = [0]
    for tid in threads:
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            if os.getpriority(os.PRIO_PROCESS, tid) < level:
                os.setpriority(os.PRIO_PROCESS, tid, level)


@ray.remote
class ToolExecutor(Telemetered):
    """Loads the configured tool modules and executes calls concurrently."""

    def __init__(
        self,
        modules: list[str],
        output_max_chars: int,
        *,
        group: str = "default",
        threads: int = 64,
        max_stuck_threads: int = 8,
        bulkhead_wait_s: float = 1.0,
        isolation: Isolation = "thread",
        niceness: int | None = None,
    ) -> None:
        if niceness is not None:
            raise_niceness(niceness)  # before the sandbox and the tool threads start
        forget_env_secrets()  # tool code runs in this process and its children
        self._setup_telemetry("tool_executor")
        self.group = group
        tools = load_tools(modules)
        self._runner = ToolRunner(
            tools,
            output_max_chars=output_max_chars,
            threads=threads,
            bulkhead_wait_s=bulkhead_wait_s,
            isolation=isolation,
        )
        if any(spec.group == group and self._runner.isolated(spec) for spec in tools.values()):
            self._runner.sandbox = Sandbox(modules)  # started now: it imports while we wait for calls
        self._max_stuck = max_stuck_threads
        self._draining = False
        self._last_refused = 0.0
        self._idle = asyncio.Event()
        self.in_flight = 0
        heap.settle()

    def definitions(self) -> dict[str, dict[str, object]]:
        return self._runner.definitions()

    def catalog(self) -> dict[str, dict[str, object]]:
        return self._runner.catalog()

    @ray.method(enable_task_events=False)  # see `Scheduler.run`
    async def execute(self, call: ToolCall) -> ToolOutcome:
        if self._draining:  # never started here: the caller sends it to another executor
            self._last_refused = time.monotonic()
            return ToolOutcome.failure(call, ToolErrorKind.UNAVAILABLE, "tool executor is being replaced")
        self.in_flight += 1
        self._idle.clear()
        span = tm.tracer.start_span(
            f"run_tool {call.name if call.name in self._runner.tools else '(unknown)'}",
            context=tm.context_of(call.traceparent),
            attributes={
                "gen_ai.tool.name": call.name[:200],
                "gen_ai.tool.call.id": call.tool_use_id,
                "agentpool.executor.group": self.group,
            },
        )
        try:
            outcome = await self._runner.execute(call)
            span.set_attribute("agentpool.tool.attempts", outcome.attempts)
            if outcome.is_error:
                span.set_attribute("error.type", outcome.error_kind or "error")
                span.set_status(trace.Status(trace.StatusCode.ERROR, outcome.content[:500]))
            return outcome
        finally:
            span.end()
            self.in_flight -= 1
            if not self.in_flight:
                self._idle.set()
            if not self._draining and self._runner.stuck >= self._max_stuck:
                self._draining = True
                self._last_refused = time.monotonic()  # and this call's reply must get out first
                asyncio.get_running_loop().create_task(self._replace())

    async def replace(self) -> int:
        """Replaces this executor's process gracefully (an upgrade): from now on it refuses
        calls (callers send them to another executor, or wait for its successor), lets its
        running ones end within their tools' timeouts, then exits and Ray starts a new
        process, which imports the tool modules installed now. Returns this process's pid."""
        if not self._draining:
            self._draining = True
            self._last_refused = time.monotonic()
            asyncio.get_running_loop().create_task(self._replace(upgrade=True))
        return os.getpid()

    async def _replace(self, *, upgrade: bool = False) -> None:
        if upgrade:
            log.warning("tool executor %s (group %s): replaced for an upgrade", os.getpid(), self.group)
        else:
            log.warning(
                "tool executor %s (group %s): %d threads stuck in tools that ignored their timeout; replacing it",
                os.getpid(),
                self.group,
                self._runner.stuck,
            )
        grace = max((s.timeout_s for s in self._runner.tools.values()), default=0.0) + _DRAIN_GRACE_S
        if self.in_flight:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), grace)
        # Callers told "unavailable" stop sending here; exit once none has tried for a while,
        # so that no call is on its way in when the process goes (it would look like a crash).
        while (quiet_left := self._last_refused + _QUIET_S - time.monotonic()) > 0:  # noqa: ASYNC110 (a time, not an event)
            await asyncio.sleep(quiet_left)
        # Threads stuck in C code or in sleep cannot be stopped: only a new process frees them.
        os._exit(1)

    def pid(self) -> int:
        """This actor's process id (an upgrade checks its replacement by it)."""
        return os.getpid()

    def ping(self) -> dict[str, object]:
        return {
            "pid": os.getpid(),
            "in_flight": self.in_flight,
            "stuck_threads": self._runner.stuck,
            "draining": self._draining,
            "sandbox_pid": self._runner.sandbox.pid if self._runner.sandbox is not None else None,
            "sandbox_killed": self._runner.sandbox.killed if self._runner.sandbox is not None else 0,
        }
