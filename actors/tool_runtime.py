"""Runs one tool call to a `ToolOutcome`, whatever the tool does (no Ray here).

A tool's failure is information for the model, not an exception for the loop: unknown
tools, invalid arguments, a full bulkhead, exceptions and timeouts all come back as
`is_error` outcomes. The whole call, retries included, fits in the tool's `timeout_s`.

Sync tools run on this runner's own thread pool. A thread cannot be killed: a sync tool
that overruns keeps its thread after its call has returned a timeout. Such threads are
counted (`stuck`), so the executor can have itself replaced once too many are stuck.
Process-isolated tools run in a `Sandbox` child instead, killed at their timeout.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import json
import random
import time
from collections.abc import Callable
from typing import Any

from agentpool.actors.tool_sandbox import Sandbox
from agentpool.config import Isolation
from agentpool.errors import ToolError
from agentpool.protocol import ToolCall, ToolOutcome
from agentpool.tools import ToolSpec
from agentpool.vocabulary import ToolErrorKind

#: Backoff between retries of an idempotent tool: base * 2**attempt, capped, with jitter.
RETRY_BASE_S = 0.05
RETRY_MAX_S = 1.0


class ToolRunner:
    """Validates, runs and bounds tool calls against a fixed set of tools.

    Args:
        tools: The tools this runner may execute, by name.
        output_max_chars: Longer output is truncated, with a note saying so.
        threads: Size of the thread pool for sync tools.
        bulkhead_wait_s: Longest a call waits for a place under its tool's `max_concurrency`.
        isolation: For tools that do not set their own.
        sandbox: Runs the process-isolated tools; required when there are any.
        clock: Monotonic seconds.
    """

    def __init__(
        self,
        tools: dict[str, ToolSpec],
        *,
        output_max_chars: int = 20_000,
        threads: int = 64,
        bulkhead_wait_s: float = 1.0,
        isolation: Isolation = "thread",
        sandbox: Sandbox | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.tools = tools
        self.isolation = isolation
        self.sandbox = sandbox
        self.output_max_chars = output_max_chars
        self.bulkhead_wait_s = bulkhead_wait_s
        self._clock = clock
        self._threads = concurrent.futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="tool")
        self._bulkheads: dict[str, asyncio.Semaphore] = {}
        self._stuck: set[concurrent.futures.Future[Any]] = set()

    def isolated(self, spec: ToolSpec) -> bool:
        """Whether the tool's calls run in a child process of their own."""
        return (spec.isolation or self.isolation) == "process"

    @property
    def stuck(self) -> int:
        """Threads still running a sync tool whose call already ended in a timeout."""
        self._stuck = {f for f in self._stuck if not f.done()}
        return len(self._stuck)

    def definitions(self) -> dict[str, dict[str, Any]]:
        return {name: spec.definition() for name, spec in sorted(self.tools.items())}

    def catalog(self) -> dict[str, dict[str, Any]]:
        """Each tool's definition (for the model) and how to route and guard its calls."""
        return {name: {"definition": spec.definition(), **spec.info()} for name, spec in sorted(self.tools.items())}

    async def execute(self, call: ToolCall) -> ToolOutcome:
        started = self._clock()
        attempts = [0]  # counted by `_run`, also when it raises
        try:
            spec = self.tools.get(call.name)
            if spec is None:
                raise ToolError(f"unknown tool {call.name!r}", tool=call.name, kind=ToolErrorKind.UNKNOWN_TOOL)
            args = spec.validate_args(call.arguments if call.arguments is not None else {})
            async with self._bulkhead(spec):
                content = await self._run(spec, spec.kwargs(args, call.idempotency_key), self._clock(), attempts)
        except ToolError as exc:
            # A tool's own `ToolError` may name a kind the pool does not know: it is an error.
            kind = ToolErrorKind.of(str(exc.fields.get("kind", ToolErrorKind.ERROR)))
            return self._outcome(call, exc.message, started, kind=kind, attempts=attempts[0])
        except TimeoutError:
            spec = self.tools[call.name]
            message = f"tool {call.name} timed out after {spec.timeout_s}s"
            return self._outcome(call, message, started, kind=ToolErrorKind.TIMEOUT, attempts=attempts[0])
        except Exception as exc:  # a tool's own bug: reported to the model, never raised
            name = getattr(exc, "type_name", type(exc).__name__)  # a process-isolated tool's, by name
            return self._outcome(call, f"{name}: {exc}", started, kind=ToolErrorKind.ERROR, attempts=attempts[0])
        return self._outcome(call, content, started, kind=None, attempts=attempts[0])

    def _bulkhead(self, spec: ToolSpec) -> _Bulkhead:
        if spec.max_concurrency is None:
            return _Bulkhead(None, 0.0, spec.name)
        semaphore = self._bulkheads.get(spec.name)
        if semaphore is None:
            semaphore = self._bulkheads[spec.name] = asyncio.Semaphore(spec.max_concurrency)
        return _Bulkhead(semaphore, self.bulkhead_wait_s, spec.name)

    async def _run(self, spec: ToolSpec, kwargs: dict[str, Any], started: float, attempts: list[int]) -> str:
        """Runs the tool from `started` (once it has its bulkhead place), retrying transient
        failures of a retryable tool inside its timeout. A `ToolError` is an answer for the
        model, not a transient failure: never retried."""
        deadline = started + spec.timeout_s
        while True:
            attempts[0] += 1
            attempt = attempts[0]
            try:
                value = await self._attempt(spec, kwargs, deadline - self._clock())
                return value if isinstance(value, str) else json.dumps(value, default=str)
            except (ToolError, TimeoutError):
                raise
            except Exception:
                delay = min(RETRY_MAX_S, RETRY_BASE_S * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
                if not spec.retryable or attempt > spec.retries or self._clock() + delay >= deadline:
                    raise
                await asyncio.sleep(delay)

    async def _attempt(self, spec: ToolSpec, kwargs: dict[str, Any], budget_s: float) -> Any:
        if budget_s <= 0:
            raise TimeoutError
        if self.isolated(spec):
            if self.sandbox is None:
                raise ToolError(f"tool {spec.name} needs process isolation; none here", tool=spec.name)
            return await self.sandbox.call(spec.name, kwargs, budget_s)
        if spec.is_async:
            return await asyncio.wait_for(spec.fn(**kwargs), budget_s)
        future = self._threads.submit(functools.partial(spec.fn, **kwargs))
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), budget_s)
        except TimeoutError:
            if not future.done():  # still running: its thread is lost until the tool returns
                self._stuck.add(future)
            raise

    def _outcome(
        self, call: ToolCall, content: str, started: float, *, kind: ToolErrorKind | None, attempts: int
    ) -> ToolOutcome:
        if len(content) > self.output_max_chars:
            dropped = len(content) - self.output_max_chars
            content = content[: self.output_max_chars] + f"\n[truncated {dropped} characters]"
        return ToolOutcome(
            tool_use_id=call.tool_use_id,
            name=call.name,
            content=content,
            is_error=kind is not None,
            error_kind=kind,
            duration_ms=(self._clock() - started) * 1000,
            attempts=attempts,
        )

    def shutdown(self) -> None:
        self._threads.shutdown(wait=False, cancel_futures=True)
        if self.sandbox is not None:
            self.sandbox.close()


class _Bulkhead:
    """`async with`: a place under the tool's concurrency limit, or `ToolError(bulkhead_full)`."""

    def __init__(self, semaphore: asyncio.Semaphore | None, wait_s: float, tool: str) -> None:
        self._semaphore = semaphore
        self._wait_s = wait_s
        self._tool = tool

    async def __aenter__(self) -> None:
        if self._semaphore is None:
            return
        if not self._semaphore.locked():
            await self._semaphore.acquire()
            return
        try:
            await asyncio.wait_for(self._semaphore.acquire(), self._wait_s)
        except TimeoutError:
            raise ToolError(
                f"tool {self._tool} is at its concurrency limit; try again later",
                tool=self._tool,
                kind=ToolErrorKind.BULKHEAD_FULL,
            ) from None

    async def __aexit__(self, *exc: object) -> None:
        if self._semaphore is not None:
            self._semaphore.release()
