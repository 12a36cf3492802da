"""The final records the scheduler writes itself: rejections, failures around a run,
cancellations of tasks that never ran, and the record of a job whose life itself failed
(a mixin of `Scheduler`, kept apart for size)."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

import ray

from agentpool import events
from agentpool.background import Background
from agentpool.errors import AgentPoolError, BudgetExceeded
from agentpool.models import AgentResult, AgentTask, ErrorInfo, Timings, agent_fields
from agentpool.scheduler.jobs import Job
from agentpool.vocabulary import ErrorReason, TaskStatus

log = logging.getLogger("agentpool.scheduler")

if TYPE_CHECKING:
    from collections import Counter

    from agentpool.cluster.store import ResultStore
    from agentpool.config import PoolConfig
    from agentpool.scheduler.observe import TaskTelemetry


def _rejection_event(error: AgentPoolError) -> type[events.BudgetExceeded | events.Shed | events.TaskRejected]:
    if isinstance(error, BudgetExceeded):
        return events.BudgetExceeded
    return events.Shed if error.retryable else events.TaskRejected


def failed_record(task: AgentTask, trace_id: str, exc: BaseException, queued_ms: float) -> AgentResult:
    """The `failed` record of a task that an error stopped around its run, saying why."""
    message = exc.message if isinstance(exc, AgentPoolError) else str(exc)
    return AgentResult(
        task_id=task.task_id,
        **agent_fields(task),
        tenant=task.tenant,
        status=TaskStatus.FAILED,
        trace_id=trace_id,
        session_id=task.session_id,
        error=ErrorInfo(type=type(exc).__name__, message=(message or type(exc).__name__)[:4000], retryable=True),
        timings=Timings(queued_ms=queued_ms),
    )


class Records:
    """`_reject`, `_fail`, `_cancelled`: each writes once and returns the stored record; and
    `_ended`, which gives every job's waiters a record however its life ended."""

    _store: ResultStore
    _counts: Counter[str]
    _shed: Counter[str]
    _telemetry: TaskTelemetry
    _jobs: dict[str, Job]
    _lives: Background
    _writes: Background
    _replies: list[AgentResult]
    _relay: Any
    _namespace: str
    config: PoolConfig

    if TYPE_CHECKING:  # Scheduler's; declared here for the type checker only

        def _abandon(self, job: Job) -> None: ...

        def _observe_end(self, job: Job, result: AgentResult | None) -> None: ...

        def _observe_agent(self, task: AgentTask, result: AgentResult) -> None: ...

        def _note_ended(self, task_id: str) -> None: ...

        def _release_turn(self, job: Job) -> None: ...

    def _ended(self, life: asyncio.Task[AgentResult | None], job: Job) -> None:
        """Resolves the job whatever its life did: every waiter (a `run` call, `enqueue`,
        `cancel`) gets a record, even when the life itself failed (a bug of ours). Then the
        job is closed: nothing of the scheduler holds it any more."""
        try:
            self._resolve(life, job)
        finally:
            job.close()

    def _resolve(self, life: asyncio.Task[AgentResult | None], job: Job) -> None:
        if self._jobs.get(job.task.task_id) is job:
            del self._jobs[job.task.task_id]
        self._release_turn(job)
        if not job.accepted.done():
            job.accepted.set_result(None)
        result: AgentResult | None = None
        if not life.cancelled() and life.exception() is None:
            result = life.result()
            if result is None:  # left in the Redis backlog, with no caller: read back in its turn
                return
        elif not life.cancelled():  # `_life` reports its failures as records: this is a bug of ours
            error = life.exception()
            self._abandon(job)
            log.error("task %s: its life in the scheduler failed", job.task.task_id, exc_info=error)
            result = failed_record(job.task, job.trace_id, error or RuntimeError("unknown"), 0.0)
            self._spawn_write(result)
        if result is not None:  # its record is written (or on its way): a read of the backlog must skip it
            self._note_ended(job.task.task_id)
        try:
            self._observe_end(job, result)
            if result is not None:
                self._observe_agent(job.task, result)
        except Exception:  # counting an end must never keep its waiters waiting
            log.exception("observing the end of task %s failed", job.task.task_id)
        if job.reply and result is not None:
            self._reply(result)
        if job.done.done():
            return
        if result is None:
            job.done.cancel()
        else:
            job.done.set_result(result)

    def _reply(self, result: AgentResult) -> None:
        """Sends a record to the relay, where a `submit` call waits for it: the records
        ending in one turn of the event loop go in one call. If the relay does not get it
        (it is restarting), it finds the record in Redis."""
        self._replies.append(result)
        if len(self._replies) == 1:
            asyncio.get_running_loop().call_soon(self._send_replies)

    def _send_replies(self) -> None:
        batch, self._replies = self._replies, []
        try:
            if self._relay is None:
                self._relay = ray.get_actor(f"{self.config.name}-relay", namespace=self._namespace)
            self._relay.deliver.remote(batch)
        except Exception as exc:  # the relay looks the records up itself
            self._relay = None
            log.warning("could not send %d records to the relay: %s", len(batch), exc)

    def _spawn_write(self, result: AgentResult) -> None:
        """Writes a record the scheduler made outside a task's life, in the background."""
        self._writes.spawn(self._store.write_result(result), then=self._writes_done)

    def _writes_done(self, write: asyncio.Task[Any]) -> None:
        if not write.cancelled() and write.exception() is not None:
            log.error("could not write a final record: %s", write.exception())

    async def _reject(self, task: AgentTask, trace_id: str, error: AgentPoolError, arrived_unix: float) -> AgentResult:
        retry_after = error.fields.get("retry_after_s")
        took_ms = round((time.time() - arrived_unix) * 1000, 3)
        result = AgentResult(
            task_id=task.task_id,
            **agent_fields(task),
            tenant=task.tenant,
            status=TaskStatus.REJECTED,
            trace_id=trace_id,
            session_id=task.session_id,
            error=ErrorInfo(
                type=error.type_name,
                message=error.message,
                retryable=error.retryable,
                reason=error.fields.get("reason"),
            ),
            retry_after_s=retry_after,
            attempts=0,
            timings=Timings(queued_ms=took_ms, total_ms=took_ms),
        )
        event = _rejection_event(error)(
            error_type=error.type_name,
            reason=result.error.reason if result.error else None,
            message=error.message,
            retry_after_s=retry_after,
        )
        stored, _ = await self._store.write_result(result, events=[event])
        reason = str(error.fields.get("reason") or error.type_name)
        self._counts["rejected"] += 1
        self._shed[reason] += 1
        self._telemetry.shed(task.tenant, reason)
        return stored

    async def _fail(self, task: AgentTask, trace_id: str, exc: BaseException, queued_ms: float) -> AgentResult:
        result = failed_record(task, trace_id, exc, queued_ms)
        try:
            stored, _ = await self._store.write_result(result)
        except Exception:  # Redis itself failed: the caller still gets the result
            return result
        return stored

    async def _cancelled(self, job: Job) -> AgentResult:
        task = job.task
        result = AgentResult(
            task_id=task.task_id,
            **agent_fields(task),
            tenant=task.tenant,
            status=TaskStatus.CANCELLED,
            trace_id=job.trace_id,
            session_id=task.session_id,
            error=ErrorInfo(
                type="Cancelled",
                message=job.cancel_reason or "cancelled",
                reason=ErrorReason.INTERRUPTED if job.interrupted is not None else ErrorReason.CANCELLED,
            ),
            attempts=0,
            timings=Timings(total_ms=round((time.time() - job.admitted_unix) * 1000, 3)),
        )
        stored, _ = await self._store.write_result(result, events=[events.TaskEnd(status=TaskStatus.CANCELLED)])
        self._counts[stored.status] += 1
        return stored
