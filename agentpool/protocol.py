"""Internal messages that cross actor boundaries (scheduler -> worker -> tool executor).

Not part of the public API, but as strictly typed as it: each one must pickle, and each one
carries the trace context so one task is one trace across processes.

The hot hops carry them `pack`ed: Ray sends `bytes` on its cheap path, while any other
object goes through its cloudpickle path, which costs far more than pickling it ourselves.
Measured on the 2-core machine, a client -> actor -> actor round trip carrying a `Dispatch`
one way and an `AgentResult` back took 2.9-3.2 ms as objects and 2.3-2.4 ms packed (each
side pickling and unpickling them itself); a plain dict took 2.2-2.3 ms.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import BaseModel, Field

from agentpool.models import AgentResult, AgentTask
from agentpool.vocabulary import ToolErrorKind, ToolSource

_T = TypeVar("_T")


def pack(value: object) -> bytes:
    """`value` as the bytes an internal actor call carries (see the module's docstring)."""
    return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)


def unpack(blob: bytes, kind: type[_T]) -> _T:
    """What `pack` made of a value of `kind`.

    Raises:
        TypeError: When the bytes hold something else (a peer of another version, say).
    """
    value = pickle.loads(blob)
    if not isinstance(value, kind):
        raise TypeError(f"an internal message held {type(value).__name__} where {kind.__name__} was expected")
    return value


def new_trace_id() -> str:
    return os.urandom(16).hex()


def traceparent(trace_id: str) -> str:
    """A W3C `traceparent` header value for a fresh span in `trace_id`."""
    return f"00-{trace_id}-{os.urandom(8).hex()}-01"


#: The phrase the agent loop's system prompt puts before a task's output schema: the one
#: contract between the loop and the simulator, which finds the schema by it.
SCHEMA_MARKER = "conforms to this JSON Schema"


class Dispatch(BaseModel):
    """A task as the scheduler hands it to a worker."""

    task: AgentTask
    trace_id: str
    traceparent: str
    admitted_at_unix: float
    queued_ms: float = 0.0
    attempt: int = 1
    #: Names this dispatch: the run holding the task's lease in Redis.
    run_id: str = Field(default_factory=lambda: os.urandom(8).hex())
    #: The scheduler accepted the task as new and this is its first dispatch: no run of it
    #: can exist, so the worker makes its first LLM call while its begin is in flight.
    fresh: bool = False
    #: The live configuration's version the scheduler applies (`pool.update_config`): a
    #: worker behind it reads the newer one from Redis before it runs the task.
    config_version: int = 0


@dataclass(frozen=True)
class RunFailed:
    """What a worker sends back for a dispatch whose run raised instead of returning a record."""

    error_type: str
    message: str


class Admitted(BaseModel):
    """A task a pool accepted, as its admissions hash in Redis keeps it until it ends."""

    task: AgentTask
    trace_id: str
    admitted_unix: float
    #: The submitter's trace context (older admissions have only the trace id).
    traceparent: str = ""
    #: A `submit` call waits for its record in the pool's relay: the record is sent there.
    reply: bool = False


class ToolCall(BaseModel):
    """One tool_use block to execute, with who asked for it."""

    task_id: str
    tenant: str
    tool_use_id: str
    name: str
    arguments: Any = None
    trace_id: str = ""
    #: Trace context of the worker's `execute_tool` span: the executor's span continues it.
    traceparent: str = ""

    @property
    def idempotency_key(self) -> str:
        """Names this call across re-runs of its task: `task_id:tool_use_id`."""
        return f"{self.task_id}:{self.tool_use_id}"


class ToolOutcome(BaseModel):
    """What a tool call produced, ready to become a `tool_result` block."""

    tool_use_id: str
    name: str
    content: str
    is_error: bool = False
    #: None when ok.
    error_kind: ToolErrorKind | None = None
    duration_ms: float = Field(default=0.0, ge=0)
    attempts: int = Field(default=1, ge=0)
    #: Where a result came from without running the tool (None: the tool ran).
    source: ToolSource | None = None

    @property
    def kind(self) -> str:
        """How the call ended, as metrics, spans and the audit trail name it: its error
        kind, else where its result came from, else `ok`."""
        return self.error_kind or self.source or "ok"

    @classmethod
    def failure(cls, call: ToolCall, kind: ToolErrorKind, content: str) -> ToolOutcome:
        """An error outcome for a call that never produced a result of its own."""
        return cls(tool_use_id=call.tool_use_id, name=call.name, content=content, is_error=True, error_kind=kind)

    def as_block(self) -> dict[str, Any]:
        block: dict[str, Any] = {
            "type": "tool_result",
            "tool_use_id": self.tool_use_id,
            "content": self.content,
        }
        if self.is_error:
            block["is_error"] = True
        return block


class Paused(BaseModel):
    """A worker's answer for a task that stopped to wait for a human's approval: its
    checkpoint is written and its slot may go to other work until the decision comes."""

    task_id: str
    tenant: str
    tool_use_ids: list[str]
    tools: list[str]
    arguments: list[Any] = Field(default_factory=list)
    requested_unix: float
    deadline_unix: float


#: What a worker sends back for one dispatch.
Outcome = AgentResult | Paused | RunFailed


def unpack_outcomes(blob: bytes) -> list[tuple[int, Outcome]]:
    """A worker's packed outcomes: each with the index of its dispatch in the call.

    Raises:
        TypeError: When the bytes hold anything else.
    """
    out = unpack(blob, list)
    for item in out:
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], AgentResult | Paused | RunFailed)):
            raise TypeError(f"an internal message held {item!r:.80} where an outcome was expected")
    return out


class ApprovalDecision(BaseModel):
    """A human's answer on an `ApprovalRequest`; `approved=None` means the deadline passed."""

    tool_use_ids: list[str]
    approved: bool | None
    note: str = Field(default="", max_length=2000)
    decided_unix: float = 0.0

    def covers(self, tool_use_ids: list[str]) -> bool:
        return set(tool_use_ids) <= set(self.tool_use_ids)


def provider_key_name(pool: str) -> str:
    """Where in Ray's internal key-value store (GCS, namespace `agentpool`) the pool's
    provider key waits for its agent workers. The facade puts it there; each worker reads it
    as it starts (and again after Ray restarts it), so no other process (the scheduler that
    starts workers, the limiter, the executors) ever receives it."""
    return f"agentpool:{pool}:provider-key"


@dataclass(frozen=True)
class WorkerSpawn:
    """How to start an agent worker, built by the facade (`agentpool.launch.worker_spawn`):
    the pool starts its first workers with it, the scheduler's fleet adds more. `start` is a
    module-level function of the facade, pickled by reference, so the scheduler starts agent
    workers without importing the actors' code."""

    #: `start(spawn, name, extra_options)` -> the new actor's handle.
    start: Callable[[WorkerSpawn, str, dict[str, Any]], Any]
    #: Ray options of the actor (resources, restarts, runtime env, ...).
    options: dict[str, Any]
    #: The worker's constructor arguments.
    kwargs: dict[str, Any]

    def launch(self, name: str, **options: Any) -> Any:
        """Starts one worker named `name`, with `options` added to the Ray options."""
        return self.start(self, name, options)
