"""How a worker makes one tool call: allowlist, cache, at-most-once record, breaker, executor.

In order:
1. A tool the task may not use (or that does not exist) is refused.
2. A cacheable tool's result is read from the tenant's cache.
3. A side-effecting tool (not idempotent) runs at most once per `task_id:tool_use_id`: a
   record is created in Redis before it runs and holds its outcome after. A re-run task
   finds the outcome and gets it back without running the tool again. If it finds only the
   "started" mark, the first run may or may not have applied its effect: a tool that takes
   an idempotency key runs again with the same key, any other is not run
   (`outcome_unknown`).
4. The tool board must let the call through: the tool's cluster-wide breaker, and its
   cluster-wide crash-loop backoff (a tool that was running in a process that died is
   refused, `restarting`, for 1 s, doubling per crash in a row).
5. An executor of the tool's group runs it. A draining executor sends it on to the next. A
   dead executor (the tool crashed its process) costs that call an error result, unless
   the tool is idempotent or keyed, in which case it gets one more try elsewhere. The dead
   executor gets a crash-loop backoff in this worker too: while every executor of the
   group is in backoff, calls are refused at once (`restarting`, a failure for the
   breaker) instead of waiting on restarts. The call is also bounded here, in case an
   executor stops answering altogether.
6. The outcome goes to the board (counts, breaker, crash streak) and to the cache or the
   record (both in Redis, through `agentpool.cluster.tool_records`).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
from collections.abc import Callable, Coroutine
from typing import Any

import ray
from opentelemetry import trace
from redis.exceptions import RedisError

from agentpool import events
from agentpool import telemetry as tm
from agentpool.actors.breaker import CrashLoop, Suspended
from agentpool.background import Background
from agentpool.cluster.tool_records import ToolRecords
from agentpool.events import Emit
from agentpool.models import tool_arguments_problem
from agentpool.protocol import ToolCall, ToolOutcome
from agentpool.redact import redact
from agentpool.vocabulary import ToolErrorKind, ToolSource, ToolTally

#: On top of a tool's timeout and bulkhead wait, before a worker gives up on an executor.
_EXECUTOR_GRACE_S = 5.0
#: How long a worker keeps away from an executor that said it is being replaced.
_AVOID_S = 10.0
#: Crash-loop backoff of an executor whose process died: first and longest wait.
_BACKOFF_S = 1.0
_BACKOFF_MAX_S = 30.0
#: Longest audit record of a call's (redacted) arguments.
_AUDIT_ARGS_MAX = 4000


_BACKGROUND = Background()


class ToolCalls:
    """One worker's tool-call path (shared by its agent loops).

    Args:
        catalog: Per tool, `ToolSpec.info()` (group, timeout, idempotent, keyed, cache TTL).
        groups: Executor actor handles per group.
        board: The pool's `ToolBoard` actor.
        records: The tool-call records and the tool cache in Redis.
        bulkhead_wait_s: The executors' bulkhead wait (part of the time a call may take).
        audit: Appends an entry to the tenant's audit trail (`ResultStore.audit`).
    """

    def __init__(
        self,
        *,
        catalog: dict[str, dict[str, Any]],
        groups: dict[str, list[Any]],
        board: Any,
        records: ToolRecords,
        bulkhead_wait_s: float,
        audit: Callable[..., None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._catalog = catalog
        self._groups = groups
        self._turn = {group: itertools.count() for group in groups}
        self._avoid: dict[tuple[str, int], float] = {}
        self._crashes = CrashLoop(_BACKOFF_S, _BACKOFF_MAX_S)  # per executor (group, index)
        self._board = board
        self._records = records
        self._bulkhead_wait_s = bulkhead_wait_s
        self._audit = audit
        self._clock = clock

    async def run(self, call: ToolCall, allowed: set[str], emit: Emit) -> ToolOutcome:
        """The call's outcome. If the task is cancelled meanwhile (its own timeout), the call
        still runs to its end in the background, bounded by the tool's timeout, so that its
        outcome reaches the breaker, the counts and the at-most-once record."""
        running = _BACKGROUND.spawn(self._guarded(call, allowed, emit))
        return await asyncio.shield(running)

    async def _guarded(self, call: ToolCall, allowed: set[str], emit: Emit) -> ToolOutcome:
        """The call under its `execute_tool` span, counted in the metrics and the audit trail."""
        tool = call.name if call.name in self._catalog else "(unknown)"
        started = self._clock()
        span = tm.tracer.start_span(
            f"execute_tool {tool}",
            attributes={
                "gen_ai.operation.name": "execute_tool",
                "gen_ai.tool.name": call.name[:200],
                "gen_ai.tool.call.id": call.tool_use_id,
                "gen_ai.tool.type": "function",
                "agentpool.tenant": call.tenant,
            },
        )
        if tm.capture_content() and span.is_recording():
            span.set_attribute("gen_ai.tool.call.arguments", tm.content(call.arguments))
        with trace.use_span(span, end_on_exit=False):
            context = tm.current_traceparent()
            if context:  # tracing on: the executor's span continues this one
                call = call.model_copy(update={"traceparent": context})
            try:
                outcome = await self._run(call, allowed, emit)
            except RedisError as exc:
                # The at-most-once record cannot be read or made before the call: a side-effecting
                # tool is not run blind. (Idempotent tools only touch Redis for their cache, which
                # fails open.)
                outcome = ToolOutcome.failure(
                    call, ToolErrorKind.UNAVAILABLE, f"tool {call.name} not run: Redis unavailable ({exc})"
                )
        kind = outcome.kind
        span.set_attribute("agentpool.tool.outcome", kind)
        if outcome.is_error:
            span.set_attribute("error.type", kind)
            span.set_status(trace.Status(trace.StatusCode.ERROR, outcome.content[:500]))
        elif tm.capture_content() and span.is_recording():
            span.set_attribute("gen_ai.tool.call.result", tm.content(outcome.content))
        span.end()
        took_s = self._clock() - started
        tm.tool_calls.add(1, {"gen_ai.tool.name": tool, "agentpool.tool.outcome": kind})
        tm.tool_duration.record(took_s, {"gen_ai.tool.name": tool})
        if self._audit is not None:
            self._audit(
                call.tenant,
                task_id=call.task_id,
                trace_id=call.trace_id,
                tool=call.name[:200],
                tool_use_id=call.tool_use_id,
                arguments=json.dumps(redact(call.arguments), default=str)[:_AUDIT_ARGS_MAX],
                outcome=kind,
                ok=not outcome.is_error,
                duration_ms=round(took_s * 1000, 2),
                attempts=outcome.attempts,
            )
        return outcome

    async def _run(self, call: ToolCall, allowed: set[str], emit: Emit) -> ToolOutcome:
        if call.name not in allowed:
            # The model asked for a tool this task was not given (or invented one).
            self._count(call.name if call.name in self._catalog else "(unknown)", ToolErrorKind.NOT_ALLOWED)
            return ToolOutcome.failure(
                call, ToolErrorKind.NOT_ALLOWED, f"tool {call.name!r} is not available; use one of {sorted(allowed)}"
            )
        problem = tool_arguments_problem(call.arguments)
        if problem is not None:  # never sent: bounded before it reaches an executor or Redis
            self._count(call.name, ToolErrorKind.INVALID_ARGUMENTS)
            return ToolOutcome.failure(
                call, ToolErrorKind.INVALID_ARGUMENTS, f"invalid arguments for {call.name}: {problem}"
            )
        info = self._catalog[call.name]
        cache_key = self._records.cache_key(call) if info.get("cache_ttl_s") else None
        if cache_key is not None:
            cached = await self._cached(cache_key)
            if cached is not None:
                self._count(call.name, "cached")
                return cached.model_copy(
                    update={
                        "tool_use_id": call.tool_use_id,
                        "source": ToolSource.CACHE,
                        "duration_ms": 0.0,
                        "attempts": 0,
                    }
                )
        recorded = not info["idempotent"]  # side effects: at most once, through its record
        claimed = False  # this attempt made the "started" mark, and removes it if the tool never runs
        if recorded:
            claim = await self._records.claim(call)
            claimed = claim.first
            if claim.outcome is not None:
                self._count(call.name, "replayed")
                return claim.outcome.model_copy(update={"source": ToolSource.RECORD})
            if not claim.first and not info["keyed"]:
                self._count(call.name, ToolErrorKind.OUTCOME_UNKNOWN)
                return ToolOutcome.failure(
                    call,
                    ToolErrorKind.OUTCOME_UNKNOWN,
                    f"an earlier run of this task started {call.name} and did not report back; it is not run "
                    "again, so its effect cannot happen twice. Check its effect before calling it anew.",
                )
        try:
            permit, denied, transition = await self._board.acquire.remote(call.name)
        except ray.exceptions.RayError:  # the board is restarting: tools go on without a breaker meanwhile
            permit, denied, transition = None, None, None
        await self._announce(transition, call, emit)
        if denied is not None:
            if claimed:
                await self._records.release(call)  # it never ran: a later attempt may
            if isinstance(denied, Suspended):
                return ToolOutcome.failure(
                    call,
                    ToolErrorKind.RESTARTING,
                    f"tool {call.name} crashed its executor's process; it is not run again for "
                    f"{denied.retry_after_s:.0f}s",
                )
            return ToolOutcome.failure(
                call,
                ToolErrorKind.BREAKER_OPEN,
                f"tool {call.name} is unavailable (failing or too slow; circuit {denied.state.replace('_', '-')}); "
                f"do not call it again for {denied.retry_after_s:.0f}s",
            )
        outcome = await self._execute(call, info)
        self._spawn(self._report(call, permit, outcome, emit))
        # The call has happened: a failure to record it must not hide its outcome. The
        # "started" mark then stays, and a re-run gets `outcome_unknown`: safe, never twice.
        with contextlib.suppress(RedisError):
            if outcome.error_kind is not None and not outcome.error_kind.ran:
                if claimed:
                    await self._records.release(call)
            elif recorded:
                await self._records.record(call, outcome)
        if cache_key is not None and not outcome.is_error:
            with contextlib.suppress(RedisError):  # a cache that cannot be written is only a miss later
                await self._records.cache(cache_key, outcome, info["cache_ttl_s"])
        return outcome

    async def _cached(self, key: str) -> ToolOutcome | None:
        try:
            return await self._records.cached(key)
        except RedisError:  # Redis away: run the tool
            return None

    async def _execute(self, call: ToolCall, info: dict[str, Any]) -> ToolOutcome:
        group = info["group"]
        executors = self._groups[group]
        limit_s = info["timeout_s"] + self._bulkhead_wait_s + _EXECUTOR_GRACE_S
        deadline = self._clock() + limit_s
        started = self._clock()
        crashes = refusals = 0
        while True:
            index = self._pick(group, len(executors))
            if index is None:
                # Every executor of the group died recently and is in crash backoff: refusing
                # at once keeps a crashing tool from holding its group in a restart loop,
                # and the refusals count against the tool's breaker.
                wait_s = min(self._crashes.wait_s((group, i), self._clock()) for i in range(len(executors)))
                return self._failed(
                    call,
                    ToolErrorKind.RESTARTING,
                    f"the executors running {call.name} crashed and are restarting; try again in {wait_s:.0f}s",
                    started,
                )
            left = deadline - self._clock()
            try:
                outcome: ToolOutcome = await asyncio.wait_for(executors[index].execute.remote(call), max(left, 0.001))
            except TimeoutError:
                return self._failed(
                    call, ToolErrorKind.TIMEOUT, f"tool {call.name} did not answer within {limit_s:.0f}s", started
                )
            except ray.exceptions.RayError as exc:
                crashes += 1
                self._crashes.crashed((group, index), self._clock())
                if info["idempotent"] or info["keyed"]:
                    if crashes <= 1 and self._clock() < deadline:
                        continue  # once more, elsewhere: it may have been another call that crashed the process
                return self._failed(
                    call,
                    ToolErrorKind.CRASHED,
                    f"tool {call.name} crashed its executor ({type(exc).__name__})",
                    started,
                )
            self._crashes.returned((group, index))
            if outcome.error_kind is ToolErrorKind.UNAVAILABLE and self._clock() < deadline:
                # That executor is being replaced: leave it alone until its successor is up.
                # When every executor of the group is, wait a little longer each time.
                self._avoid[(group, index)] = self._clock() + _AVOID_S
                refusals += 1
                await asyncio.sleep(min(1.0, 0.01 * 2**refusals))
                continue
            return outcome

    def _pick(self, group: str, size: int) -> int | None:
        """The group's next executor in turn: not in crash backoff, and not being replaced
        unless all the others are. None when every one is in crash backoff."""
        now = self._clock()
        usable = [i for i in range(size) if self._crashes.wait_s((group, i), now) <= 0]
        if not usable:
            return None
        preferred = [i for i in usable if self._avoid.get((group, i), 0.0) <= now] or usable
        return preferred[next(self._turn[group]) % len(preferred)]

    def _failed(self, call: ToolCall, kind: ToolErrorKind, message: str, started: float) -> ToolOutcome:
        outcome = ToolOutcome.failure(call, kind, message)
        outcome.duration_ms = (self._clock() - started) * 1000
        return outcome

    async def _report(self, call: ToolCall, permit: Any, outcome: ToolOutcome, emit: Emit) -> None:
        try:
            duration_s = outcome.duration_ms / 1000
            transition = await self._board.record.remote(call.name, permit, outcome.error_kind, duration_s)
            await self._announce(transition, call, emit)
        except Exception:  # the board restarting, or Redis away: counts are best effort, the call is done
            return

    async def _announce(self, transition: dict[str, object] | None, call: ToolCall, emit: Emit) -> None:
        if transition is not None:
            await emit(events.BreakerState.model_validate(transition))

    def _count(self, tool: str, kind: ToolTally) -> None:
        self._board.count.remote(tool, kind)

    @staticmethod
    def _spawn(coro: Coroutine[Any, Any, None]) -> None:
        _BACKGROUND.spawn(coro)
