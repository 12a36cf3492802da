"""The final records the scheduler writes itself: rejections, failures around a run, and
cancellations of tasks that never ran (a mixin of `Scheduler`, kept apart for size)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from agentpool.errors import AgentPoolError
from agentpool.models import AgentResult, AgentTask, ErrorInfo, Timings
from scheduler.jobs import Job

if TYPE_CHECKING:
    from collections import Counter

    from cluster.store import ResultStore
    from scheduler.observe import TaskTelemetry


def _rejection_event(error: AgentPoolError) -> str:
    if error.type_name == "BudgetExceeded":
        return "budget_exceeded"
    return "shed" if error.retryable else "task_rejected"


def failed_record(task: AgentTask, trace_id: str, exc: BaseException, queued_ms: float) -> AgentResult:
    """The `failed` record of a task that an error stopped around its run, saying why."""
    message = exc.message if isinstance(exc, AgentPoolError) else str(exc)
    return AgentResult(
        task_id=task.task_id,
        tenant=task.tenant,
        status="failed",
        trace_id=trace_id,
        error=ErrorInfo(type=type(exc).__name__, message=(message or type(exc).__name__)[:4000], retryable=True),
        timings=Timings(queued_ms=queued_ms),
    )


class Records:
    """`_reject`, `_fail`, `_cancelled`: each writes once and returns the stored record."""

    _store: ResultStore
    _counts: Counter[str]
    _shed: Counter[str]
    _telemetry: TaskTelemetry

    async def _reject(self, task: AgentTask, trace_id: str, error: AgentPoolError, arrived_unix: float) -> AgentResult:
        retry_after = error.fields.get("retry_after_s")
        took_ms = round((time.time() - arrived_unix) * 1000, 3)
        result = AgentResult(
            task_id=task.task_id,
            tenant=task.tenant,
            status="rejected",
            trace_id=trace_id,
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
        stored, created = await self._store.write_result(result)
        if created:
            self._store.post(
                task.tenant,
                _rejection_event(error),
                task_id=task.task_id,
                trace_id=trace_id,
                error_type=error.type_name,
                reason=error.fields.get("reason", error.message),
                retry_after_s=retry_after,
            )
            await self._store.flush()
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
            tenant=task.tenant,
            status="cancelled",
            trace_id=job.trace_id,
            error=ErrorInfo(type="Cancelled", message=job.cancel_reason or "cancelled", reason="cancelled"),
            attempts=0,
            timings=Timings(total_ms=round((time.time() - job.admitted_unix) * 1000, 3)),
        )
        stored, created = await self._store.write_result(result)
        if created:
            self._store.post(task.tenant, "task_end", task_id=task.task_id, trace_id=job.trace_id, status="cancelled")
        self._counts[stored.status] += 1
        return stored
