"""Public data models of what the pool gives back: a task's final record (`AgentResult`)
with its usage, error, tool calls and timings, and where a task stands now (`TaskState`).
Re-exported by `agentpool.models`."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from agentpool.vocabulary import ErrorReason, TaskPhase, TaskStatus, ToolErrorKind, Variant


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


class Usage(_Model):
    """Tokens and money spent; input/cache fields follow Anthropic's `usage` object."""

    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_input_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cost_usd: float = 0.0
    #: LLM calls answered from the response cache (no provider call: their tokens are not
    #: counted above, they cost nothing), and what they cost when they were first made.
    cached_responses: int = 0
    saved_usd: float = 0.0

    @classmethod
    def from_api(cls, raw: dict[str, Any] | None) -> Usage:
        """From a Messages API `usage` object (missing or null counts are 0; cost unpriced)."""
        raw = raw or {}
        return cls(
            input_tokens=raw.get("input_tokens") or 0,
            output_tokens=raw.get("output_tokens") or 0,
            cache_read_input_tokens=raw.get("cache_read_input_tokens") or 0,
            cache_creation_input_tokens=raw.get("cache_creation_input_tokens") or 0,
        )

    @property
    def total_tokens(self) -> int:
        """All tokens processed: every input kind (cached or not) plus output."""
        return self.input_tokens + self.cache_read_input_tokens + self.cache_creation_input_tokens + self.output_tokens

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            input_tokens=self.input_tokens + other.input_tokens,
            output_tokens=self.output_tokens + other.output_tokens,
            cache_read_input_tokens=self.cache_read_input_tokens + other.cache_read_input_tokens,
            cache_creation_input_tokens=self.cache_creation_input_tokens + other.cache_creation_input_tokens,
            cost_usd=round(self.cost_usd + other.cost_usd, 10),
            cached_responses=self.cached_responses + other.cached_responses,
            saved_usd=round(self.saved_usd + other.saved_usd, 10),
        )


class ErrorInfo(_Model):
    """Why a task did not succeed, in a form a program can branch on."""

    type: str
    message: str = Field(max_length=4096)
    retryable: bool = False
    #: Why, where a program can act on it (`ErrorReason`): for rejections `overload`,
    #: `predicted_wait`, `queue_full`, `queue_timeout`, `evicted`, `prompt_injection`,
    #: `daily_token_budget` or `daily_cost_budget`; else `cancelled`, `approval_deadline`,
    #: a daily budget, or None.
    reason: ErrorReason | None = None


class ToolCallSummary(_Model):
    """One tool call the agent made, without its (possibly large or sensitive) payloads."""

    tool_use_id: str
    name: str
    ok: bool
    error_kind: ToolErrorKind | None = None
    duration_ms: float = 0.0
    iteration: int = 0


class Timings(_Model):
    """Where the time went, in milliseconds: waiting in the queue, running (of which waiting
    for rate-limit permits), end to end."""

    queued_ms: float = 0.0
    run_ms: float = 0.0
    permit_wait_ms: float = 0.0
    total_ms: float = 0.0


class AgentResult(_Model):
    """The final record of one task; `ray.get` on a submitted ref returns one of these."""

    task_id: str
    tenant: str
    status: TaskStatus
    answer: Any = None
    error: ErrorInfo | None = None
    usage: Usage = Field(default_factory=Usage)
    iterations: int = 0
    tool_calls: list[ToolCallSummary] = Field(default_factory=list)
    timings: Timings = Field(default_factory=Timings)
    #: How many times the task was run (more than 1 after a crash and re-delivery).
    attempts: int = 1
    #: LLM requests sent, retries and fallbacks included (iterations counts only successes).
    llm_attempts: int = 0
    trace_id: str = ""
    model: str | None = None
    stop_reason: str | None = None
    retry_after_s: float | None = None
    #: Times the task resumed from its checkpoint (after a crash, or an approval), and the
    #: LLM turns those resumes did not have to send again.
    resumes: int = 0
    llm_calls_saved: int = 0
    #: The session the task continued, if any.
    session_id: str | None = None
    #: Times a routed task (`model="auto"`) moved up to a stronger model.
    escalations: int = 0
    #: The agent the task ran, its version's tag and its side of a rollout (`AgentTask.agent`).
    agent: str | None = None
    agent_version: str | None = None
    variant: Variant | None = None
    #: Why the task ran again from its first turn though a checkpoint of it was found: one
    #: written in a checkpoint format this version of agentpool does not read (an upgrade).
    checkpoint_discarded: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "succeeded"


class TaskState(_Model):
    """Where one task stands now (`pool.get`, `GET /v1/runs/{id}`)."""

    task_id: str
    tenant: str
    phase: TaskPhase
    #: Queued: the tasks of its tenant that go before it (0: it is next).
    place: int | None = None
    #: Queued in the scheduler: when it should start, by the scheduler's wait forecast.
    predicted_start_unix: float | None = None
    #: Running or paused: which run of it this is (more than 1 after a crash).
    attempt: int | None = None
    #: Running or paused: LLM turns done and what they cost, from its events so far.
    iteration: int = 0
    usage: Usage = Field(default_factory=Usage)
    #: Awaiting approval: the tools, their arguments (credentials redacted) and the deadline.
    approval: dict[str, Any] | None = None
    #: Finished: the final record.
    result: AgentResult | None = None


class DrainReport(_Model):
    """What a drain (`pool.drain`, `agentpool drain`, `shutdown(grace_s=...)`) did and left.

    Nothing it leaves is lost: queued work waits in the Redis backlog and tasks still
    running resume from their last checkpoint, both taken up by the next pool of this name
    on the same Redis (`AgentPool.start`)."""

    #: Every task that was running when the drain began has ended.
    drained: bool
    grace_s: float
    elapsed_s: float
    #: Tasks that ended while the pool drained.
    finished: int = 0
    #: Tasks still running when the grace period ended (they resume from their checkpoints).
    running: list[str] = Field(default_factory=list)
    #: Accepted tasks that had not started: they wait in the Redis backlog.
    queued: int = 0
    #: Tasks waiting for a human's approval (their checkpoints keep them).
    paused: int = 0
    #: Arrivals refused while the pool drained (`ErrorReason.DRAINING`).
    refused: int = 0
