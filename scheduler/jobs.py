"""A task's life in the scheduler (`Job`), and the approval requests kept in Redis for it.

A job is accepted once, then queued, run, and perhaps paused (for a human's approval) or
queued again (its worker died, its approval came) until its final record exists. Everything
about it that must survive the scheduler lives in Redis: the admission, the checkpoint, the
approval request and decision; the job itself is only the in-memory handle on it.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from agentpool.cluster.store import ResultStore

from agentpool.models import AgentResult, AgentTask
from agentpool.protocol import ApprovalDecision, Paused, new_trace_id, traceparent
from agentpool.redact import redact
from agentpool.telemetry import trace_id_of

JobState = Literal["admitting", "queued", "running", "paused"]
#: How many pending approval requests of a tenant are read when looking one up.
_MAX_PENDING_APPROVALS = 10_000


def _future() -> asyncio.Future[Any]:
    return asyncio.get_running_loop().create_future()


def trace_context(context: str) -> str:
    """The submitter's W3C trace context, or a fresh trace when it carries none."""
    return context if trace_id_of(context) else traceparent(new_trace_id())


@dataclass(eq=False)
class Job:
    """One accepted (or being admitted) task and where it stands."""

    task: AgentTask
    #: The W3C trace context the submitter gave the task (its trace id is the task's).
    traceparent: str
    admitted_unix: float
    #: Accepted before (by a scheduler that restarted, or on an earlier delivery of the same
    #: call): it goes straight to the queue, ahead of new work, and never waits out a deadline.
    adopted: bool = False
    done: asyncio.Future[AgentResult] = field(default_factory=_future)
    #: Set once the job is queued or done: what `Scheduler.enqueue` waits for.
    accepted: asyncio.Future[None] = field(default_factory=_future)
    state: JobState = "admitting"
    enqueued_at: float = 0.0
    max_wait_s: float = math.inf
    estimate: float = 0.0
    limit_key: str | None = None
    slot: asyncio.Future[int] = field(default_factory=_future)
    #: The worker slot granted to the job and not yet given back.
    held: int | None = None
    attempt: int = 1
    worker: int | None = None
    paused: Paused | None = None
    decision: asyncio.Future[ApprovalDecision | None] | None = None
    #: What the tenant's prompt-injection screen found in the task (source -> rules), for
    #: `injection_detected` events once the task is admitted (they follow `task_admitted`).
    findings: dict[str, list[str]] = field(default_factory=dict)
    cancel_reason: str | None = None
    #: The task's `invoke_agent` span, and its current `queue_wait` span (OpenTelemetry).
    span: Any = None
    queue_span: Any = None

    @property
    def trace_id(self) -> str:
        return trace_id_of(self.traceparent)

    @property
    def resumed(self) -> bool:
        """It ran before: queued again, it goes first and is never dropped for waiting."""
        return self.adopted or self.attempt > 1 or self.paused is not None

    def requeue(self, now: float) -> None:
        self.slot = _future()
        self.enqueued_at = now
        self.max_wait_s = math.inf
        self.state = "queued"


class Approvals:
    """A tenant's pending approval requests (a stream; an entry leaves once decided) and
    the decisions (one key per task, read by the run that resumes it)."""

    def __init__(self, store: ResultStore, ttl_s: int) -> None:
        self._store = store
        self._ttl_s = ttl_s

    async def request(self, job: Job, paused: Paused) -> None:
        """Lists the request unless it already is (a task paused again after a restart)."""
        t = job.task
        if await self._entries(t.tenant, t.task_id):
            return
        await self._store.redis.xadd(
            self._store.keys.approvals(t.tenant),
            {
                "task_id": t.task_id,
                "trace_id": job.trace_id,
                "tools": json.dumps(paused.tools),
                # The reviewer sees the arguments, less anything shaped like a credential.
                "arguments": json.dumps(redact(paused.arguments, pii=False), default=str)[:20_000],
                "tool_use_ids": json.dumps(paused.tool_use_ids),
                "requested_unix": repr(paused.requested_unix),
                "deadline_unix": repr(paused.deadline_unix),
            },
        )

    async def decide(self, tenant: str, task_id: str, decision: ApprovalDecision) -> None:
        """Records the decision, then takes the request off the pending list."""
        redis = self._store.redis
        await redis.set(self._store.keys.approval(tenant, task_id), decision.model_dump_json(), ex=self._ttl_s)
        entries = await self._entries(tenant, task_id)
        if entries:
            await redis.xdel(self._store.keys.approvals(tenant), *entries)

    async def pending(self, tenant: str) -> list[dict[str, Any]]:
        raw = await self._store.redis.xrange(self._store.keys.approvals(tenant), count=_MAX_PENDING_APPROVALS)
        return [
            {
                "entry_id": entry_id,
                "task_id": fields["task_id"],
                "tools": json.loads(fields["tools"]),
                "arguments": _json_or_none(fields["arguments"]),
                "tool_use_ids": json.loads(fields["tool_use_ids"]),
                "requested_unix": float(fields["requested_unix"]),
                "deadline_unix": float(fields["deadline_unix"]),
                "expired": float(fields["deadline_unix"]) < time.time(),
            }
            for entry_id, fields in raw
        ]

    async def _entries(self, tenant: str, task_id: str) -> list[str]:
        raw = await self._store.redis.xrange(self._store.keys.approvals(tenant), count=_MAX_PENDING_APPROVALS)
        return [entry_id for entry_id, fields in raw if fields.get("task_id") == task_id]


def _json_or_none(raw: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError:  # cut short: arguments are bounded in the stream
        return None
