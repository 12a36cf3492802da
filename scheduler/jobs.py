"""A task's life in the scheduler (`Job`).

A job is accepted once, then queued (in memory, or first in the Redis backlog), run, and
perhaps paused (for a human's approval) or queued again (its worker died, its approval came)
until its final record exists. Everything about it that must survive the scheduler lives in
Redis: the admission, the checkpoint, the
approval request and decision; the job itself is only the in-memory handle on it.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import Any, Literal

from agentpool.models import AgentResult, AgentTask
from agentpool.protocol import ApprovalDecision, Paused, new_trace_id, traceparent
from agentpool.scheduler.core import Ticket
from agentpool.scheduler.turns import Arrival
from agentpool.telemetry import trace_id_of
from agentpool.vocabulary import OnBusy

#: `waiting`: for its session's turn (another task of the session runs), outside the queue.
JobState = Literal["admitting", "waiting", "queued", "running", "paused"]


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
    #: Read from the backlog in Redis: accepted (and checked) already, it is only queued.
    from_backlog: bool = False
    #: Accepted by this scheduler as new (Redis held no admission of it) and not dispatched
    #: since: no run of it can exist anywhere (`Dispatch.fresh`).
    fresh: bool = False
    #: How many `run` calls wait for its record (none: a detached submission).
    callers: int = 0
    #: The relay waits for its record (a `submit` call): it is sent there when it ends.
    reply: bool = False
    #: While it waits in the Redis backlog for its turn with callers waiting: set when it is
    #: read into the queue (or with `CancelledInQueue`, cancelled there).
    pulled: asyncio.Future[None] | None = None
    done: asyncio.Future[AgentResult] = field(default_factory=_future)
    #: Set once the job is queued or done: what `Scheduler.enqueue` waits for.
    accepted: asyncio.Future[None] = field(default_factory=_future)
    state: JobState = "admitting"
    #: Its place in the scheduler's core (queue, slot, forecast, cost estimate); set as
    #: the job is made.
    ticket: Ticket[Job] = field(init=False)
    #: The worker slot, once the core grants one (or why it will not).
    slot: asyncio.Future[int] = field(default_factory=_future)
    attempt: int = 1
    worker: int | None = None
    paused: Paused | None = None
    decision: asyncio.Future[ApprovalDecision | None] | None = None
    #: What the tenant's prompt-injection screen found in the task (source -> rules), for
    #: `injection_detected` events once the task is admitted (they follow `task_admitted`).
    findings: dict[str, list[str]] = field(default_factory=dict)
    cancel_reason: str | None = None
    #: Set when a later task of its session interrupts it (and how).
    interrupted: OnBusy | None = None
    #: Its place in its session's line, taken as it arrived (`SessionGate`).
    arrival: Arrival[Job] | None = None
    #: Tasks of its session sent before it in one call: it takes its place after theirs.
    after: tuple[str, ...] = ()
    #: While it is held for them: the timer that stops the wait, and what it awaits.
    held: asyncio.TimerHandle | None = None
    placed: asyncio.Future[None] | None = None
    #: While it waits for its session's turn: set when the turn is its (`SessionGate`).
    turn: asyncio.Future[None] | None = None
    #: How long it waited for its session's turn (counted in its queued time).
    session_wait_s: float = 0.0
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

    @property
    def detached(self) -> bool:
        """No one waits for its record: no `run` call, and not the relay (a `submit`'s)."""
        return not self.callers and not self.reply

    def close(self) -> None:
        """Its life in the scheduler is over: it lets go of its ticket, which holds it as the
        ticket's `item`, so that reference counting frees both (and all they hold) at once.
        Left as a cycle, every ended task waited for the garbage collector (`heap`)."""
        with contextlib.suppress(AttributeError):  # a job that never got a ticket
            del self.ticket

    def requeue(self) -> None:
        """Queued again (its worker died, its approval came): a new wait for a slot."""
        self.slot = _future()
        self.state = "queued"
