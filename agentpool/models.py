"""Public data models: what a user submits (`AgentTask`) and gets back (`AgentResult`).

Everything that enters the pool is validated here, at the edge, with every size bounded, so
nothing malformed or unbounded ever reaches a queue, an actor or Redis.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Collection, Iterable
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, field_validator, model_validator

# Re-exported (`as`): the public models name them, and users import them from here too.
from agentpool.results import AgentResult as AgentResult
from agentpool.results import ErrorInfo as ErrorInfo
from agentpool.results import TaskState as TaskState
from agentpool.results import Timings as Timings
from agentpool.results import ToolCallSummary as ToolCallSummary
from agentpool.results import Usage as Usage
from agentpool.routing import Routing
from agentpool.tenant_parts import MAX_HISTORY_BYTES as MAX_HISTORY_BYTES
from agentpool.tenant_parts import MAX_HISTORY_MESSAGES as MAX_HISTORY_MESSAGES
from agentpool.tenant_parts import PII_KINDS as PII_KINDS
from agentpool.tenant_parts import Guardrails as Guardrails
from agentpool.tenant_parts import ModelName as ModelName
from agentpool.tenant_parts import PiiKind as PiiKind
from agentpool.tenant_parts import RateLimit as RateLimit
from agentpool.tenant_parts import SessionPolicy as SessionPolicy
from agentpool.vocabulary import CacheMode as CacheMode
from agentpool.vocabulary import ErrorReason as ErrorReason
from agentpool.vocabulary import Lane as Lane
from agentpool.vocabulary import OnBusy as OnBusy
from agentpool.vocabulary import TaskPhase as TaskPhase
from agentpool.vocabulary import TaskStatus as TaskStatus
from agentpool.vocabulary import ToolErrorKind as ToolErrorKind
from agentpool.vocabulary import Variant as Variant

# Tenant names end up inside Redis keys and ACL patterns (`agentpool:{acme}:*`): no braces,
# globs, colons or spaces, so one tenant's name can never address another tenant's keys.
TenantName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]
TaskId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")]
#: A session's id names Redis keys too (`agentpool:{acme}:session:<id>`).
SessionId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")]
ToolName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
#: A registered agent, by name (`support`), label (`support@v3`) or hash (`support@sha:1f2e3d`):
#: the one pattern of a reference (`agentpool.agents.AgentRef` parses with its groups).
AGENT_REF_PATTERN = (
    r"^(?P<name>[A-Za-z0-9][A-Za-z0-9_-]{0,63})"
    r"(?:@(?:sha:(?P<sha>[0-9a-f]{6,64})|(?P<label>[A-Za-z0-9][A-Za-z0-9_.-]{0,31})))?$"
)
AgentRefText = Annotated[str, StringConstraints(pattern=AGENT_REF_PATTERN)]
#: The task fields an agent's spec decides: a task that names an agent leaves them unset.
SPEC_FIELDS = ("system", "model", "fallback_models", "tier", "tools", "output_schema")
#: Limits its spec decides too: a task that names an agent leaves them at their defaults.
SPEC_LIMITS = ("max_tokens", "max_iterations", "token_budget", "timeout_s")
MetaValue = str | int | float | bool | None

Priority = Literal["critical", "standard", "sheddable"]
#: The priority classes, the most important first.
PRIORITIES: tuple[Priority, ...] = get_args(Priority)

MAX_PROMPT_CHARS = 200_000
MAX_SYSTEM_CHARS = 100_000
MAX_SCHEMA_BYTES = 32_768
MAX_SCHEMA_DEPTH = 12
MAX_METADATA_ITEMS = 32


#: Bounds on the arguments a model passes to a tool, checked before the call leaves the worker.
MAX_TOOL_ARGS_BYTES = 256 * 1024
MAX_TOOL_ARGS_DEPTH = 32


def tool_arguments_problem(arguments: Any) -> str | None:
    """Why a tool call's arguments cannot be sent (not an object, too large, too deep), or None."""
    if not isinstance(arguments, dict):
        return f"arguments must be a JSON object, not {type(arguments).__name__}"
    try:
        size = len(json.dumps(arguments, separators=(",", ":"), default=str))
    except (ValueError, RecursionError):
        return "arguments cannot be serialised as JSON"
    if size > MAX_TOOL_ARGS_BYTES:
        return f"arguments are {size} bytes of JSON; at most {MAX_TOOL_ARGS_BYTES}"
    if _depth(arguments) > MAX_TOOL_ARGS_DEPTH:
        return f"arguments nest deeper than {MAX_TOOL_ARGS_DEPTH} levels"
    return None


def _new_task_id() -> str:
    return uuid.uuid4().hex


def _depth(node: Any) -> int:
    """How deeply containers nest in a JSON-like value (iterative: any depth is safe)."""
    deepest, stack = 0, [(node, 0)]
    while stack:
        item, level = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            deepest = max(deepest, level)
            continue
        deepest = max(deepest, level + 1)
        stack.extend((child, level + 1) for child in children)
    return deepest


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


class AgentTask(_Model):
    """One unit of agent work.

    `task_id` doubles as the idempotency key: submitting the same id twice yields one final
    record in Redis, never two.
    """

    # NaN and infinity are not numbers a bound can hold (`timeout_s=nan` passes `gt=0`).
    model_config = ConfigDict(extra="forbid", frozen=False, allow_inf_nan=False)

    task_id: TaskId = Field(default_factory=_new_task_id)
    tenant: TenantName
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    system: str | None = Field(default=None, max_length=MAX_SYSTEM_CHARS)
    tools: list[ToolName] = Field(default_factory=list, max_length=64)
    #: The model, or "auto": the pool's router picks the cheapest model capable enough
    #: (`tier`) and moves up on failure (`PoolConfig.routing`, `TenantPolicy.routing`).
    model: ModelName | None = None
    fallback_models: list[ModelName] | None = Field(default=None, max_length=4)
    #: With `model="auto"`: the least capability tier the task needs (1 when None).
    tier: int | None = Field(default=None, ge=1, le=10)
    #: How its LLM calls reach the provider (`Lane`); when None, the batch lane if its
    #: `deadline_s` is far enough and the pool has one (`PoolConfig.batch_lane`).
    lane: Lane | None = None
    max_tokens: int = Field(default=1024, ge=1, le=64_000)
    max_iterations: int = Field(default=10, ge=1, le=100)
    token_budget: int | None = Field(default=None, ge=1, le=10_000_000)
    #: Whether its LLM calls may be answered from the response cache (`CacheMode`); the
    #: tenant's `TenantPolicy.cache` when None.
    cache: CacheMode | None = None
    #: The most this task may spend, in USD at the pool's price table: each LLM call's worst
    #: case (its estimated input at the dearest input rate, plus `max_tokens` of output) is
    #: checked before it is sent, and the task stops (`budget_exhausted`, `task_cost_cap`,
    #: with the work done so far) rather than send a call that could cross it.
    max_cost_usd: float | None = Field(default=None, gt=0, le=100_000)
    timeout_s: float = Field(default=120.0, gt=0, le=86_400)
    output_schema: dict[str, Any] | None = None
    priority: Priority = "standard"
    #: Longest acceptable wait in the queue before the task starts; a task that cannot start
    #: in time is rejected at once (or dropped from the queue) instead of running late.
    deadline_s: float | None = Field(default=None, gt=0, le=86_400)
    metadata: dict[Annotated[str, StringConstraints(max_length=64)], MetaValue] = Field(default_factory=dict)
    #: LLM calls use the streaming API, and their text reaches the task's events as it comes
    #: (`text_delta`, coalesced); the result and its usage are the same.
    stream: bool = False
    #: Continues this session of the tenant: its history is loaded before the prompt, and
    #: the new turns are stored with the final record (`pool.sessions`).
    session_id: SessionId | None = None
    #: What this task does if its session is running another task (`OnBusy`).
    on_busy: OnBusy = OnBusy.ENQUEUE
    #: The conversation so far, for callers who keep their own history (not with
    #: `session_id`): Messages API messages, before the prompt, which is the next user turn.
    messages: list[dict[str, Any]] | None = Field(default=None, max_length=MAX_HISTORY_MESSAGES)
    #: Runs a registered agent (`pool.agents`): its spec gives the system prompt, models,
    #: tools, limits and output schema, so the task spells none of them. A bare name runs
    #: the agent's current version, or the one its rollout assigns; `name@label` or
    #: `name@sha:<hex>` pins one. When None, the tenant's `TenantPolicy.agent` if it has one
    #: and the task spells none of those fields.
    agent: AgentRefText | None = None
    #: Set by the pool as it resolves `agent`: the version's tag (`v3+1f2e3d4c5b6a`). A task
    #: that has one keeps it (re-delivered after a crash, it runs on the same version).
    agent_version: str | None = Field(default=None, max_length=80)
    #: Set by the pool: the side of the agent's rollout the task runs on.
    variant: Variant | None = None
    #: Set by the pool on a shadow copy: the live task it copies.
    shadow_of: TaskId | None = None

    def __init__(self, **data: Any) -> None:
        """Raises:
        InvalidTaskInput: If a field is missing, malformed or over its bound (it is also
            pydantic's `ValidationError`).
        """
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise _invalid(exc) from None

    @classmethod
    def model_validate(cls, obj: Any, **options: Any) -> AgentTask:
        try:
            return super().model_validate(obj, **options)
        except ValidationError as exc:
            raise _invalid(exc) from None

    @classmethod
    def model_validate_json(cls, json_data: str | bytes | bytearray, **options: Any) -> AgentTask:
        try:
            return super().model_validate_json(json_data, **options)
        except ValidationError as exc:
            raise _invalid(exc) from None

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, prompt: str) -> str:
        if not prompt.strip():
            raise ValueError("the prompt is blank (only whitespace)")
        return prompt

    @field_validator("tools")
    @classmethod
    def _unique_tools(cls, tools: list[str]) -> list[str]:
        return list(dict.fromkeys(tools))

    @field_validator("metadata")
    @classmethod
    def _bounded_metadata(cls, meta: dict[str, MetaValue]) -> dict[str, MetaValue]:
        if len(meta) > MAX_METADATA_ITEMS:
            raise ValueError(f"metadata has {len(meta)} items; at most {MAX_METADATA_ITEMS}")
        for key, value in meta.items():
            if isinstance(value, str) and len(value) > 1024:
                raise ValueError(f"metadata[{key!r}] is longer than 1024 characters")
        return meta

    @field_validator("messages")
    @classmethod
    def _valid_history(cls, messages: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        if messages is None:
            return None
        from agentpool.conversation import history_problem

        size = len(json.dumps(messages, separators=(",", ":"), default=str))
        if size > MAX_HISTORY_BYTES:
            raise ValueError(f"messages are {size} bytes of JSON; at most {MAX_HISTORY_BYTES}")
        if _depth(messages) > MAX_TOOL_ARGS_DEPTH:
            raise ValueError(f"messages nest deeper than {MAX_TOOL_ARGS_DEPTH} levels")
        problem = history_problem(messages)
        if problem is not None:
            raise ValueError(problem)
        return messages

    @model_validator(mode="after")
    def _one_history(self) -> AgentTask:
        if self.session_id is not None and self.messages is not None:
            raise ValueError("a task continues a session (session_id) or brings its history (messages), not both")
        problem = self.spec_conflict()
        if problem is not None:
            raise ValueError(problem)
        return self

    def spec_conflict(self) -> str | None:
        """Why this task cannot take its agent's spec (it names an agent, is not resolved
        yet, and spells a field the spec decides), or None."""
        if self.agent is None or self.agent_version is not None:
            return None
        spelled = [f for f in SPEC_FIELDS if getattr(self, f) not in (None, [])]
        spelled += [f for f in SPEC_LIMITS if getattr(self, f) != type(self).model_fields[f].default]
        if not spelled:
            return None
        return f"a task that names an agent takes {', '.join(spelled)} from the agent's spec: leave them unset"

    @property
    def spells_an_agent(self) -> bool:
        """It spells its own system prompt, models, tools or schema (a tenant's default agent
        is not applied to it)."""
        return any(getattr(self, f) not in (None, []) for f in SPEC_FIELDS)

    @field_validator("output_schema")
    @classmethod
    def _valid_schema(cls, schema: dict[str, Any] | None) -> dict[str, Any] | None:
        if schema is None:
            return None
        size = len(json.dumps(schema))
        if size > MAX_SCHEMA_BYTES:
            raise ValueError(f"output_schema is {size} bytes; at most {MAX_SCHEMA_BYTES}")
        if _depth(schema) > MAX_SCHEMA_DEPTH:
            raise ValueError(f"output_schema nests deeper than {MAX_SCHEMA_DEPTH} levels")
        from jsonschema import Draft202012Validator
        from jsonschema.exceptions import SchemaError

        try:
            Draft202012Validator.check_schema(schema)
        except SchemaError as exc:
            raise ValueError(f"output_schema is not a valid JSON Schema: {exc.message}") from exc
        return schema


def agent_fields(task: AgentTask) -> dict[str, Any]:
    """What a task's record says of its agent (`AgentResult.agent`, ...): nothing for a
    task that names none."""
    if task.agent is None:
        return {}
    return {"agent": task.agent.split("@")[0], "agent_version": task.agent_version, "variant": task.variant}


class TenantPolicy(_Model):
    """What one tenant may do. Unknown tenants get `PoolConfig.default_tenant_policy`.

    `allowed_tools` / `allowed_models` of None mean "anything the pool offers". `weight` is the
    tenant's share under contention (served in proportion, in token units); `limits` caps the
    tenant's own rate across all models (calls over it wait in the tenant's queue); the daily
    budgets (UTC days) reject work once spent, with the time they reset.
    """

    weight: float = Field(default=1.0, gt=0, le=1000)
    max_concurrency: int | None = Field(default=None, ge=1, le=100_000)
    limits: RateLimit = Field(default_factory=RateLimit)
    daily_token_budget: int | None = Field(default=None, ge=1, le=10**13)
    daily_cost_budget_usd: float | None = Field(default=None, gt=0, le=10**9)
    allowed_tools: list[ToolName] | None = None
    allowed_models: list[ModelName] | None = None
    guardrails: Guardrails = Field(default_factory=Guardrails)
    #: Hosts the tenant's webhooks may be sent to (exact names, or patterns like
    #: `*.example.com`); None allows any public host.
    webhook_hosts: list[Annotated[str, StringConstraints(max_length=253)]] | None = Field(default=None, max_length=100)
    sessions: SessionPolicy = Field(default_factory=SessionPolicy)
    #: The tenant's default for `AgentTask.cache`, and how long a cached response lives.
    cache: CacheMode = CacheMode.OFF
    cache_ttl_s: int = Field(default=3600, ge=1, le=30 * 86_400)
    #: How `model="auto"` routes this tenant's tasks, in place of `PoolConfig.routing`.
    routing: Routing | None = None
    #: The agent (`pool.agents`) a task of this tenant runs when it names none and spells
    #: no system prompt, model, tools or schema of its own.
    agent: AgentRefText | None = None


def _invalid(error: ValidationError) -> Exception:
    from agentpool.errors import InvalidTaskInput

    return InvalidTaskInput.from_validation(error)


#: At most this many problems are listed in one `InvalidTaskInput`.
_MAX_LISTED_ERRORS = 100


def validate_tasks(
    tasks: Iterable[AgentTask | dict[str, Any]], *, tools: Collection[str] | None = None
) -> list[AgentTask]:
    """Every task of a batch checked (dicts parsed, tasks built earlier checked again), and,
    given the pool's `tools`, every tool a task names is one of them.

    Raises:
        InvalidTaskInput: If any is invalid; `errors` lists `{index, loc, msg, type}`, never
            the offending values (they may be large, or secret).
    """
    from agentpool.errors import InvalidTaskInput, task_problems

    valid: list[AgentTask] = []
    errors: list[dict[str, Any]] = []
    bad = 0
    for index, task in enumerate(tasks):
        try:
            # A task built earlier and changed since (`task.prompt = ...`) is checked again, from
            # its fields: the bounds hold for what is sent, not for what was first constructed.
            # Only here, at the edge: models that carry a task inside the pool take it as it is.
            # (`dict(iter(task))`: `dict(task)` first looks for a `keys` attribute, which
            # pydantic's `__getattr__` answers slowly with an AttributeError.)
            checked = AgentTask.model_validate(dict(iter(task)) if isinstance(task, AgentTask) else task)
        except ValidationError as exc:
            bad += 1
            errors += task_problems(exc, index)[: _MAX_LISTED_ERRORS - len(errors)]
            continue
        unknown = [name for name in checked.tools if tools is not None and name not in tools]
        if unknown:
            bad += 1
            for name in unknown:
                if len(errors) < _MAX_LISTED_ERRORS:
                    at = checked.tools.index(name)
                    msg = f"unknown tool {name!r}: this pool has {', '.join(sorted(tools or [])) or 'no tools'}"
                    errors.append({"index": index, "loc": ["tools", at], "msg": msg, "type": "unknown_tool"})
            continue
        valid.append(checked)
    if bad:
        first = errors[0]
        where = ".".join(str(p) for p in first["loc"]) or "(task)"
        raise InvalidTaskInput.of(
            f"{bad} of {bad + len(valid)} tasks are invalid; nothing was submitted. "
            f"First: task {first['index']}, {where}: {first['msg']}"[:2000],
            errors,
        )
    return valid
