"""The sections of `TenantPolicy` (rate limits, guardrails, sessions) and the names and
bounds they share with the task model; all re-exported by `agentpool.models`."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

#: The kinds of personal data redaction knows (`agentpool.redact`).
PiiKind = Literal["email", "phone", "card", "national_id"]
PII_KINDS: tuple[PiiKind, ...] = ("email", "phone", "card", "national_id")
ModelName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._:@/-]{1,128}$")]
#: Bounds on a history a caller sends with a task (`AgentTask.messages`), and a session's.
MAX_HISTORY_MESSAGES = 2_000
MAX_HISTORY_BYTES = 4 * 1024 * 1024


class RateLimit(BaseModel):
    """Per-minute limits on the three dimensions Anthropic enforces; None means no limit.

    Input tokens count `input_tokens + cache_creation_input_tokens`, never cache reads.
    """

    model_config = ConfigDict(extra="forbid")

    rpm: int | None = Field(default=None, ge=1, le=10**9)
    itpm: int | None = Field(default=None, ge=1, le=10**12)
    otpm: int | None = Field(default=None, ge=1, le=10**12)

    def per_minute(self) -> dict[str, int]:
        """The configured dimensions, by the names used in buckets and status."""
        dims = {"requests": self.rpm, "input_tokens": self.itpm, "output_tokens": self.otpm}
        return {dim: limit for dim, limit in dims.items() if limit is not None}


class Guardrails(BaseModel):
    """A tenant's input and output guardrails (all off by default).

    `injection` screens the task's prompt and system prompt at admission, and every tool
    result, for prompt injection (`agentpool.guardrails`): "flag" records an
    `injection_detected` event and goes on; "block" also refuses a flagged task (failed,
    `InjectionDetected`) and withholds a flagged tool result from the model (an error
    result in its place). With screening on, tool output is wrapped in a `<tool_output>`
    element the model is told holds data, never instructions (`wrap_tool_output` turns
    that on alone). `redact_pii` replaces the `pii_kinds` of personal data in final
    answers, events and the audit trail with markers (`[EMAIL]`, `[CARD]`, ...).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    injection: Literal["off", "flag", "block"] = "off"
    wrap_tool_output: bool = False
    redact_pii: bool = False
    pii_kinds: list[PiiKind] = Field(default_factory=lambda: list(PII_KINDS), max_length=len(PII_KINDS))

    @property
    def wraps_tool_output(self) -> bool:
        return self.wrap_tool_output or self.injection != "off"

    @property
    def pii(self) -> list[str]:
        """The kinds to redact: none unless `redact_pii`."""
        return list(self.pii_kinds) if self.redact_pii else []


class SessionPolicy(BaseModel):
    """Limits on a tenant's sessions (`AgentTask.session_id`), and their compaction.

    A session lives `ttl_s` after its last turn. A task whose session is over `max_messages`
    or `max_bytes` when it starts fails (`session_full`). With `compact_above_tokens`, a
    task whose session's history is estimated above it first has the older turns summarised
    into one message by `compaction_model` (the task's own model when None), keeping about
    `keep_recent_tokens` of the latest turns as they are; the summary's cost is the task's.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    ttl_s: int = Field(default=7 * 86_400, ge=60, le=366 * 86_400)
    max_messages: int = Field(default=1_000, ge=2, le=MAX_HISTORY_MESSAGES)
    max_bytes: int = Field(default=2 * 1024 * 1024, ge=1024, le=MAX_HISTORY_BYTES)
    compact_above_tokens: int | None = Field(default=50_000, ge=100, le=10_000_000)
    keep_recent_tokens: int = Field(default=8_000, ge=0, le=10_000_000)
    compaction_model: ModelName | None = None
    summary_max_tokens: int = Field(default=1_024, ge=16, le=16_000)
