"""The scheduler's part of each task's trace, and the pool's task metrics.

Per task: an `invoke_agent {pool}` span from admission to the final record (the task's root
in this process, a child of the submitter's span), with a `queue_wait` child for each wait
for a worker slot. The worker's spans hang under `invoke_agent` through the `traceparent`
of the dispatch. A scheduler that restarts opens a new `invoke_agent` in the same trace for
the tasks it takes up.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from opentelemetry import trace
from opentelemetry.metrics import CallbackOptions, Observation

from agentpool import telemetry as tm
from agentpool.models import AgentResult, AgentTask
from agentpool.scheduler.jobs import Job
from agentpool.vocabulary import TaskStatus

#: Statuses that mark the task's span as an error (a rejection or a cancellation is not one).


def _observe(read: Callable[[], dict[str, int]]) -> list[Observation]:
    """Per-tenant gauge values. Called on the metrics exporter's thread while the scheduler's
    loop may change what it reads: a read that collides with a change is tried again."""
    for _ in range(3):
        try:
            return [Observation(n, {"agentpool.tenant": t}) for t, n in read().items()]
        except RuntimeError:  # changed size during iteration
            continue
    return []


class TaskTelemetry:
    """Spans and metrics of the tasks one scheduler handles.

    Args:
        agent_name: `gen_ai.agent.name` of every task (the pool's name).
        queue_depth: Queued tasks per tenant, read when metrics are collected.
        in_flight: Running tasks per tenant, read when metrics are collected.
    """

    def __init__(
        self,
        agent_name: str,
        queue_depth: Callable[[], dict[str, int]],
        in_flight: Callable[[], dict[str, int]],
    ) -> None:
        self.agent_name = agent_name
        self._queue_depth = queue_depth
        self._in_flight = in_flight
        tm.meter.create_observable_gauge(
            "agentpool.queue.depth",
            callbacks=[self._observe_queue],
            unit="{task}",
            description="Tasks waiting in the scheduler's queue, by tenant.",
        )
        tm.meter.create_observable_gauge(
            "agentpool.tasks.in_flight",
            callbacks=[self._observe_in_flight],
            unit="{task}",
            description="Tasks running on workers, by tenant.",
        )

    def _observe_queue(self, options: CallbackOptions) -> list[Observation]:
        return _observe(self._queue_depth)

    def _observe_in_flight(self, options: CallbackOptions) -> list[Observation]:
        return _observe(self._in_flight)

    def begin(self, job: Job) -> None:
        task = job.task
        job.span = tm.tracer.start_span(
            f"invoke_agent {self.agent_name}",
            context=tm.context_of(job.traceparent),
            kind=trace.SpanKind.INTERNAL,
            attributes={
                "gen_ai.operation.name": "invoke_agent",
                "gen_ai.provider.name": tm.PROVIDER,
                "gen_ai.agent.name": self.agent_name,
                "gen_ai.conversation.id": task.task_id,
                "agentpool.task_id": task.task_id,
                "agentpool.tenant": task.tenant,
                "agentpool.priority": task.priority,
                "agentpool.adopted": job.adopted,
            },
        )
        if task.model:
            job.span.set_attribute("gen_ai.request.model", task.model)
        job.span.set_attributes(_agent_attributes(task))

    def dispatch_traceparent(self, job: Job) -> str:
        """The `traceparent` a worker continues the task's trace from."""
        return tm.span_traceparent(job.span, fallback=job.traceparent) if job.span is not None else job.traceparent

    def queued(self, job: Job) -> None:
        parent = trace.set_span_in_context(job.span) if job.span is not None else tm.context_of(job.traceparent)
        job.queue_span = tm.tracer.start_span(
            "queue_wait",
            context=parent,
            attributes={
                "agentpool.tenant": job.task.tenant,
                "agentpool.priority": job.task.priority,
                "agentpool.attempt": job.attempt,
            },
        )

    def dequeued(self, job: Job, waited_s: float, worker: int | None) -> None:
        tm.queue_wait.record(waited_s, {"agentpool.tenant": job.task.tenant})
        if job.queue_span is not None:
            if worker is not None:
                job.queue_span.set_attribute("agentpool.worker", worker)
            job.queue_span.end()
            job.queue_span = None

    def shed(self, tenant: str, reason: str) -> None:
        tm.shed.add(1, {"agentpool.tenant": tenant, "agentpool.reason": reason})

    def backlogged(self, job: Job) -> None:
        """Closes the spans of a task left to wait in the Redis backlog with no caller: it
        gets new ones when it is read back."""
        if job.span is not None:
            job.span.set_attribute("agentpool.backlogged", True)
            job.span.end()
            job.span = None

    def ended(self, job: Job, result: AgentResult | None) -> None:
        """Closes the task's spans and counts its end (None: the scheduler's own bug)."""
        tenant = job.task.tenant
        status = result.status if result is not None else TaskStatus.FAILED
        took_s = max(0.0, time.time() - job.admitted_unix)
        labels = {"agentpool.tenant": tenant, "agentpool.status": status, **_agent_attributes(job.task)}
        tm.tasks_ended.add(1, labels)
        tm.task_duration.record(took_s, labels)
        if job.queue_span is not None:  # it never left the queue (rejected, cancelled)
            job.queue_span.end()
            job.queue_span = None
        span = job.span
        if span is None:
            return
        attributes: dict[str, Any] = {"agentpool.status": status}
        if result is not None:
            usage = result.usage
            attributes.update(tm.usage_attributes(usage.model_dump()))
            attributes["agentpool.cost_usd"] = usage.cost_usd
            attributes["agentpool.iterations"] = result.iterations
            attributes["agentpool.attempts"] = result.attempts
            if result.error is not None:
                attributes["error.type"] = result.error.type
        span.set_attributes(attributes)
        if status.fell_short:
            message = result.error.message[:500] if result is not None and result.error else status
            span.set_status(trace.Status(trace.StatusCode.ERROR, message))
        span.end()
        job.span = None


def _agent_attributes(task: AgentTask) -> dict[str, str]:
    """`agent.name`, `agent.version` and `agentpool.variant` of a task that runs a
    registered agent (its root span's attributes, and labels of its task metrics)."""
    if task.agent is None:
        return {}
    out = {"agent.name": task.agent.split("@")[0], "agent.version": task.agent_version or ""}
    if task.variant is not None:
        out["agentpool.variant"] = task.variant.value
    return out
