"""What `AgentPool.submit` works out for each task it sends: where its trace starts, which
task of its session goes before it, and which of the client's direct calls still wait."""

from __future__ import annotations

import ray

from agentpool import telemetry as tm
from agentpool.models import AgentTask
from agentpool.protocol import new_trace_id, traceparent


def unresolved(refs: list[ray.ObjectRef]) -> list[ray.ObjectRef]:
    """The refs not resolved yet (none is fetched, none waited for)."""
    if not refs:
        return refs
    _, pending = ray.wait(refs, num_returns=len(refs), timeout=0, fetch_local=False)
    return list(pending)


def session_order(tasks: list[AgentTask]) -> list[tuple[str, ...]]:
    """For each task, the task of its session just before it in `tasks`, as a tuple of at
    most one id (a task of no session, or the first of its session here, has none)."""
    last: dict[tuple[str, str], str] = {}
    out: list[tuple[str, ...]] = []
    for task in tasks:
        if task.session_id is None:
            out.append(())
            continue
        key = (task.tenant, task.session_id)
        out.append((last[key],) if key in last else ())
        last[key] = task.task_id
    return out


def trace_context(task: AgentTask) -> str:
    """The `traceparent` a task's trace starts from: a `submit_task` span of this process
    (a child of the caller's current span, if any), when this process records traces; else
    the caller's current span; else a fresh trace id."""
    span = tm.tracer.start_span(
        "submit_task",
        kind=tm.trace.SpanKind.PRODUCER,
        attributes={"agentpool.task_id": task.task_id, "agentpool.tenant": task.tenant},
    )
    span.end()
    return tm.span_traceparent(span) or tm.current_traceparent() or traceparent(new_trace_id())
