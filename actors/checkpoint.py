"""An agent loop's state between turns, and the writer that keeps it in Redis (no Ray).

A run saves a `LoopState` after every step that cost something to produce: an LLM turn, each
tool outcome, a finished tool turn. A task that runs again after a crash starts from the
last one: the turns it holds are not sent to the model again, and the tool outcomes it holds
are not executed again. The checkpoint goes when the task's final record is written.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable
from typing import Any

from pydantic import BaseModel, Field, ValidationError

from agentpool.models import ToolCallSummary, Usage
from agentpool.protocol import ToolOutcome


class ApprovalRequest(BaseModel):
    """Tool calls of one turn waiting for a human, and until when."""

    tool_use_ids: list[str]
    tools: list[str]
    arguments: list[Any] = Field(default_factory=list)
    requested_unix: float
    deadline_unix: float


#: The checkpoint format this version of agentpool writes. Bump it when a change to
#: `LoopState` would make an older reader misread a new checkpoint (or the reverse), and
#: list in `READABLE_FORMATS` the older formats this version still reads right.
CHECKPOINT_FORMAT = 1
READABLE_FORMATS = frozenset({CHECKPOINT_FORMAT})


class LoopState(BaseModel):
    """Everything an `AgentLoop` needs to go on from where it stopped."""

    #: The checkpoint format (`CHECKPOINT_FORMAT`) it was written in.
    version: int = CHECKPOINT_FORMAT
    messages: list[dict[str, Any]]
    usage: Usage = Field(default_factory=Usage)
    iterations: int = 0
    llm_attempts: int = 0
    tool_calls: list[ToolCallSummary] = Field(default_factory=list)
    last_text: str | None = None
    model: str | None = None
    stop_reason: str | None = None
    models: list[str] = Field(default_factory=list)
    #: Running time spent over every run so far (waiting for approval not included).
    elapsed_s: float = 0.0
    #: Outcomes already in of the turn in progress, by tool_use_id.
    outcomes: dict[str, ToolOutcome] = Field(default_factory=dict)
    approval: ApprovalRequest | None = None
    #: How many times the task resumed, and the LLM turns those resumes did not send again.
    resumes: int = 0
    llm_calls_saved: int = 0
    #: How many of `messages` came before the task's prompt (its session's history, or the
    #: caller's `messages`): the stable prefix, where the prompt-cache mark goes.
    history: int = 0
    #: The version of the session the history was read at (a session's task only).
    session_version: int | None = None
    #: The session's older turns were summarised into one message before the first call.
    compacted: bool = False
    #: Times a routed task moved up to a stronger model.
    escalations: int = 0

    def pending_tool_uses(self) -> list[dict[str, Any]]:
        """The tool_use blocks of the last assistant turn if their results are not in yet."""
        if not self.messages or self.messages[-1].get("role") != "assistant":
            return []
        content = self.messages[-1].get("content") or []
        return [b for b in content if isinstance(b, dict) and b.get("type") == "tool_use"]


def load_checkpoint(raw: str | None) -> tuple[LoopState | None, str | None]:
    """A checkpoint read back from Redis, checked: the state to resume from, or None and why
    it cannot be (a format this version does not read, written by another version of
    agentpool during an upgrade, or a payload that does not parse). A task whose checkpoint
    is refused runs again from its first turn, and its record says why."""
    if raw is None:
        return None, None
    try:
        found = json.loads(raw)
    except ValueError:
        return None, "the checkpoint is not JSON"
    version = found.get("version") if isinstance(found, dict) else None
    if version not in READABLE_FORMATS:
        readable = ", ".join(str(v) for v in sorted(READABLE_FORMATS))
        return None, f"checkpoint format {version!r} is not one this version reads ({readable})"
    try:
        return LoopState.model_validate(found), None
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in first["loc"])
        return None, f"checkpoint format {version} does not validate: {where}: {first['msg']}"


Save = Callable[[str], Awaitable[None]]


class Checkpointer:
    """Writes the newest state, one write at a time: a state saved while a write is in
    flight replaces any older one still waiting, so a burst of tool outcomes costs at most
    two writes. A failed write is counted, never raised: the task goes on without it."""

    def __init__(self, save: Save) -> None:
        self._save = save
        self._latest: str | None = None
        self._writer: asyncio.Task[None] | None = None
        self.writes = 0
        self.failures = 0

    def __call__(self, state: LoopState) -> None:
        self._latest = state.model_dump_json()  # a snapshot: the loop goes on changing its state
        if self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(self._write())

    async def _write(self) -> None:
        while self._latest is not None:
            payload, self._latest = self._latest, None
            try:
                await self._save(payload)
                self.writes += 1
            except Exception:
                self.failures += 1

    async def flush(self) -> None:
        """Waits for the newest state to be written (or to fail)."""
        if self._writer is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(self._writer)

    def discard(self) -> None:
        """Drops what is still waiting (the task is final: its checkpoint is gone)."""
        self._latest = None
