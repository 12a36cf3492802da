"""The structured events of a tenant's events stream, one model per `EventType`.

An entry of `agentpool:{<tenant>}:events` holds `event` (the type), `task_id`, `trace_id`,
`ts` and `data`: the event's fields as JSON, written by `Event.data()` (the one place events
are serialised; `ResultStore.post` writes them). Optional fields appear in `data` only when
the event sets them.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from agentpool.models import ErrorInfo, Timings, Usage
from agentpool.vocabulary import ErrorReason, EscalationReason, EventType, Lane, TaskStatus, ToolErrorKind

#: Every event model, by its type (filled as they are defined).
EVENTS: dict[EventType, type[Event]] = {}
#: Sends one event of the task at hand (a worker binds its tenant, task and trace).
Emit = Callable[["Event"], Awaitable[None]]
#: A task's agent and its version's tag (`AgentResult.agent`, `.agent_version`), or Nones.
AgentTag = tuple[str | None, str | None]


class Event(BaseModel):
    """One event; subclasses name their `TYPE`."""

    model_config = ConfigDict(frozen=True, populate_by_name=True, extra="forbid")
    TYPE: ClassVar[EventType]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "TYPE" in cls.__dict__:
            if cls.TYPE in EVENTS:
                raise TypeError(f"two event models for {cls.TYPE}: {EVENTS[cls.TYPE].__name__}, {cls.__name__}")
            EVENTS[cls.TYPE] = cls

    def data(self) -> dict[str, Any]:
        """The event's fields as they are stored: JSON types, set fields only."""
        return self.model_dump(mode="json", by_alias=True, exclude_unset=True)


class EventEntry(BaseModel):
    """One entry of an events stream as read back (`pool.events`, SSE): its stream id, which
    a reader resumes after, and the entry's fields with `data` decoded."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str
    event: EventType
    task_id: str
    trace_id: str = ""
    ts: float = 0.0
    data: dict[str, Any] = Field(default_factory=dict)
    #: The task's agent and version tag, for a task that runs a registered agent.
    agent: str = ""
    agent_version: str = ""

    @classmethod
    def from_stream(cls, entry_id: str, fields: dict[str, str]) -> EventEntry:
        return cls(
            id=entry_id,
            event=EventType(fields["event"]),
            task_id=fields.get("task_id", ""),
            trace_id=fields.get("trace_id", ""),
            ts=float(fields.get("ts") or 0.0),
            data=json.loads(fields.get("data") or "{}"),
            agent=fields.get("agent", ""),
            agent_version=fields.get("agent_version", ""),
        )


def progress(entries: Iterable[EventEntry]) -> tuple[int, Usage]:
    """A task's LLM turns so far and their usage, from its events (each `llm_call` is one
    successful call: its iteration and what it cost; a `session_compacted` adds the cost
    of its summary)."""
    iteration, usage = 0, Usage()
    for entry in entries:
        if entry.event in (EventType.LLM_CALL, EventType.SESSION_COMPACTED):
            data = entry.data
            iteration = max(iteration, int(data.get("iteration") or 0))
            usage = usage + Usage(
                input_tokens=int(data.get("input_tokens") or 0),
                output_tokens=int(data.get("output_tokens") or 0),
                cache_read_input_tokens=int(data.get("cache_read_input_tokens") or 0),
                cache_creation_input_tokens=int(data.get("cache_creation_input_tokens") or 0),
                cost_usd=float(data.get("cost_usd") or 0.0),
            )
    return iteration, usage


class TaskAdmitted(Event):
    TYPE = EventType.TASK_ADMITTED
    priority: str
    #: Tasks queued in the pool when this one was admitted.
    queued: int
    #: Accepted before (a restarted scheduler, or a repeated delivery): not new work.
    adopted: bool


class InjectionDetected(Event):
    TYPE = EventType.INJECTION_DETECTED
    #: Where: the task's `prompt`, `system` or `metadata`, or a `tool_result`.
    source: str
    rules: list[str]
    #: What the tenant's screen did: `flagged`, `withheld` or `rejected`.
    action: str
    iteration: int | None = None
    tool: str | None = None
    tool_use_id: str | None = None


class TaskResumed(Event):
    TYPE = EventType.TASK_RESUMED
    #: The iteration its checkpoint ended at.
    iteration: int
    attempt: int


class LeaseWait(Event):
    TYPE = EventType.LEASE_WAIT
    #: The run that holds the task (another worker's, still alive).
    holder: str | None


class LlmCall(Event):
    TYPE = EventType.LLM_CALL
    iteration: int
    model: str
    stop_reason: str | None
    input_tokens: int
    output_tokens: int
    cache_read_input_tokens: int
    cache_creation_input_tokens: int
    cost_usd: float
    latency_ms: float
    attempts: int
    #: Answered from the response cache (no provider call; its tokens and cost are 0).
    cached: bool = False
    #: The lane that answered it (a batch-lane call is priced at batch prices).
    lane: Lane = Lane.REALTIME


class TextDelta(Event):
    TYPE = EventType.TEXT_DELTA
    model: str
    #: The attempt of the call it belongs to (a retried attempt's text is superseded).
    attempt: int
    text: str


class Retry(Event):
    TYPE = EventType.RETRY
    model: str
    attempt: int
    #: The provider's HTTP status (None: no answer, e.g. a connection error).
    status: int | None
    error_type: str | None
    delay_s: float


class Fallback(Event):
    TYPE = EventType.FALLBACK
    from_model: str
    to_model: str
    reason: str


class LaneFallback(Event):
    """A batch-lane call went on the real-time lane: no answer from the batch lane in the
    task's time, or its batch request errored, expired or was cancelled."""

    TYPE = EventType.LANE_FALLBACK
    model: str
    reason: str


class ModelEscalated(Event):
    """A routed task (`model="auto"`) moved up to a stronger model for the rest of its run."""

    TYPE = EventType.MODEL_ESCALATED
    iteration: int
    from_model: str
    to_model: str
    reason: EscalationReason


class ToolCallStarted(Event):
    TYPE = EventType.TOOL_CALL
    iteration: int
    tool: str
    tool_use_id: str
    #: The call's arguments with credential-named keys redacted, when their JSON is at most
    #: `MAX_EVENT_ARGS_BYTES` (what an eval's `tool_called` checks).
    arguments: dict[str, Any] | None = None


#: Arguments larger than this (as JSON) are left out of a `tool_call` event.
MAX_EVENT_ARGS_BYTES = 4096


class ToolResult(Event):
    TYPE = EventType.TOOL_RESULT
    iteration: int
    tool: str
    tool_use_id: str
    ok: bool
    error_kind: ToolErrorKind | None
    duration_ms: float


class BreakerState(Event):
    TYPE = EventType.BREAKER_STATE
    tool: str
    from_state: str = Field(alias="from")
    to: str
    calls: int
    failure_rate: float
    slow_rate: float
    calls_ran_so_far: int
    unix_ts: float


class OutputInvalid(Event):
    TYPE = EventType.OUTPUT_INVALID
    iteration: int
    problem: str


class ApprovalRequested(Event):
    TYPE = EventType.APPROVAL_REQUESTED
    tools: list[str]
    deadline_unix: float


class ApprovalDecided(Event):
    TYPE = EventType.APPROVAL_DECIDED
    approved: bool
    note: str


class _Rejection(Event):
    #: The error's type (`Overloaded`, `BudgetExceeded`, `UnknownTenant`, ...).
    error_type: str | None = None
    reason: ErrorReason | None = None
    message: str = ""
    retry_after_s: float | None = None


class BudgetExceeded(_Rejection):
    """At admission (with the error's type and retry hint), or between two LLM calls of a
    running task (its reason and message)."""

    TYPE = EventType.BUDGET_EXCEEDED


class Shed(_Rejection):
    TYPE = EventType.SHED


class TaskRejected(_Rejection):
    TYPE = EventType.TASK_REJECTED


class TaskEnd(Event):
    TYPE = EventType.TASK_END
    status: TaskStatus
    cost_usd: float | None = None
    models: list[str] | None = None
    iterations: int | None = None
    usage: Usage | None = None
    timings: Timings | None = None
    error: ErrorInfo | None = None


class Alert(Event):
    TYPE = EventType.ALERT
    kind: str
    #: `firing` or `resolved`.
    state: str
    value: float
    threshold: float


class SessionWait(Event):
    TYPE = EventType.SESSION_WAIT
    session_id: str
    #: The task of the session that runs now.
    behind: str


class SessionCompacted(Event):
    TYPE = EventType.SESSION_COMPACTED
    session_id: str
    model: str
    #: Messages of the history summarised into one, and those kept as they were.
    summarised: int
    kept: int
    #: The history's estimated input tokens before and after.
    tokens_before: int
    tokens_after: int
    #: What the summary cost (counted in the task's usage, and against its limits).
    input_tokens: int
    output_tokens: int
    cost_usd: float
    #: The lane that answered the summary's call, and whether the response cache did.
    lane: Lane = Lane.REALTIME
    cached: bool = False
