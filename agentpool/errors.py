"""The error hierarchy of agentpool.

Two families, kept apart on purpose:

* **Control signals** (`RetryLater` and its children) mean "not now": the caller may try the
  same thing again after `retry_after_s`. They become `AgentResult(status="rejected")` or
  drive our own retry loop; they are never a bug.
* **Failures** (everything else under `AgentPoolError`) mean the thing asked for cannot be
  done as asked.

Every error crosses actor boundaries, so each one pickles with its structured fields intact
(`__reduce__` rebuilds it from keyword arguments; `tests/test_pickling.py` round-trips all).
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError
from pydantic_core import InitErrorDetails

from agentpool.vocabulary import ErrorReason, ToolErrorKind


class AgentPoolError(Exception):
    """Raised for any error agentpool itself defines; the root of the hierarchy."""

    #: Whether doing the same thing again later may succeed.
    retryable: bool = False

    def __init__(self, message: str, **fields: Any) -> None:
        super().__init__(message)
        self.message = message
        self.fields = fields
        for key, value in fields.items():
            setattr(self, key, value)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.message, self.fields))

    @property
    def type_name(self) -> str:
        return type(self).__name__


def _rebuild(cls: type[AgentPoolError], message: str, fields: dict[str, Any]) -> AgentPoolError:
    return cls(message, **fields)


# --- control signals ---------------------------------------------------------------------


class RetryLater(AgentPoolError):
    """Raised when the request is sound but cannot be served now; see `retry_after_s`."""

    retryable = True

    def __init__(self, message: str, *, retry_after_s: float, **fields: Any) -> None:
        super().__init__(message, retry_after_s=retry_after_s, **fields)


class Overloaded(RetryLater):
    """Raised when the pool sheds a task because its queue is full or too slow."""


class Draining(RetryLater):
    """Raised when the pool is draining (stopping or being upgraded) and takes no new work."""


class BudgetExceeded(RetryLater):
    """Raised when a tenant's daily token or cost budget is spent; retry after the reset."""


class SessionBusy(RetryLater):
    """Raised when a task asks `on_busy="reject"` and its session is running another task."""


# --- failures ----------------------------------------------------------------------------


class ConfigError(AgentPoolError):
    """Raised when the pool configuration cannot work (bad URL, missing binary, no workers)."""


class InvalidConfig(ConfigError, ValueError):
    """Raised when `PoolConfig` cannot be built from the environment: an `AGENTPOOL_*`
    variable that is not a setting, or one whose value is not valid; `problems` lists
    each, by the variable's name, with the format expected."""


class InvalidTask(AgentPoolError):
    """Raised when a task is well-formed but cannot run here (unknown tool, unknown tenant)."""


class InvalidWebhook(AgentPoolError):
    """Raised when a webhook endpoint cannot be registered: not an http(s) URL, a host off
    the tenant's allowlist or an internal address, an unknown event, too many endpoints."""


class _Problems(list[dict[str, Any]]):
    """`InvalidTaskInput.errors`: the list of problems, `{index, loc, msg, type}`; called
    (`errors()`), pydantic's own list, as for any `ValidationError`."""

    def __init__(self, problems: list[dict[str, Any]], owner: Any) -> None:
        super().__init__(problems)
        self._owner = owner

    def __call__(self, **options: Any) -> Any:
        return ValidationError.errors(self._owner, **options)


class InvalidTaskInput(InvalidTask, ValidationError):
    """Raised when a task is malformed or over a size bound: by `AgentTask(...)` (and its
    `model_validate*`), and by `submit`/`enqueue`, which then send nothing of the batch.
    `errors` lists `{index, loc, msg, type}` (the task's place in the batch, None for a
    single task, and what is wrong, without the offending value). It is also a pydantic
    `ValidationError` (so `except ValidationError` and `errors()` work as for any model)."""

    # Built by `of`: pydantic's error type has no Python constructor.
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    @classmethod
    def of(cls, message: str, problems: list[dict[str, Any]]) -> InvalidTaskInput:
        """The error for `problems` (`{index, loc, msg, type}`, with pydantic's `ctx` if any)."""
        lines: list[InitErrorDetails] = []
        for problem in problems:
            loc = tuple(problem["loc"]) if problem.get("index") is None else (problem["index"], *problem["loc"])
            line: InitErrorDetails = {"type": problem["type"], "loc": loc, "input": None}
            if problem.get("ctx"):
                line["ctx"] = problem["ctx"]
            lines.append(line)
        try:
            exc = cls.from_exception_data("AgentTask", lines, hide_input=True)
        except (KeyError, TypeError, ValueError):  # a type whose context is gone (unpickled): its message
            plain: list[InitErrorDetails] = [
                {"type": "value_error", "loc": line.get("loc", ()), "input": None, "ctx": {"error": problem["msg"]}}
                for line, problem in zip(lines, problems, strict=True)
            ]
            exc = cls.from_exception_data("AgentTask", plain, hide_input=True)
        public = [{k: v for k, v in p.items() if k != "ctx"} for p in problems]
        exc.message = message
        exc.fields = {"errors": public}
        # Our list, callable as pydantic's method: `errors` is both here (see _Problems).
        exc.errors = _Problems(public, exc)  # type: ignore[method-assign]
        exc.args = (message,)
        return exc

    @classmethod
    def from_validation(cls, error: ValidationError) -> InvalidTaskInput:
        """pydantic's error about one task as ours."""
        if isinstance(error, InvalidTaskInput):
            return error
        problems = task_problems(error)
        where = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(task)'}: {e['msg']} [{e['type']}]" for e in problems[:5]
        )
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        return cls.of(f"invalid task: {where}{more}"[:2000], problems)

    def __str__(self) -> str:
        return self.message

    @property
    def problems(self) -> list[dict[str, Any]]:
        """What is wrong: `{index, loc, msg, type}` per problem, without the values."""
        return list(self.__dict__.get("errors", []))  # the _Problems set by `of`

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_input, (self.message, self.problems))


def task_problems(error: ValidationError, index: int | None = None) -> list[dict[str, Any]]:
    """pydantic's account of what is wrong with a task as `{index, loc, msg, type, ctx}`, with
    no input value (it may be large, or secret); `index` is its place in a batch."""
    return [
        {"index": index, "loc": list(e["loc"]), "msg": e["msg"], "type": e["type"], "ctx": e.get("ctx")}
        for e in error.errors(include_url=False, include_input=False)
    ]


def _rebuild_input(message: str, problems: list[dict[str, Any]]) -> InvalidTaskInput:
    return InvalidTaskInput.of(message, problems)


class InjectionDetected(InvalidTask):
    """Raised (as a failed result) when the tenant's prompt-injection screen flags a task's
    input and its guardrails say `injection="block"`; `rules` names what matched."""


class UnknownTenant(InvalidTask):
    """Raised when `strict_tenants` is set and a task names a tenant with no policy."""


class UnknownTool(InvalidTask):
    """Raised when a task or a model asks for a tool that is not registered or not allowed."""


class UnknownAgent(InvalidTask):
    """Raised when a task or a command names an agent, version or label that is not registered."""

    def __init__(self, message: str, **fields: Any) -> None:
        fields.setdefault("reason", ErrorReason.UNKNOWN_AGENT)
        super().__init__(message, **fields)


class AgentConflict(InvalidTask):
    """Raised when a registration would change what a name or label already means (a label
    names one version for ever)."""


class PoolNotRunning(AgentPoolError):
    """Raised when a pool method is called after `shutdown()` or before the pool is found."""


class ProviderError(AgentPoolError):
    """Raised when the LLM provider answers with an error we will not (or may no longer) retry."""

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        error_type: str | None = None,
        retryable: bool = False,
        retry_after_s: float | None = None,
        **fields: Any,
    ) -> None:
        super().__init__(
            message,
            status_code=status_code,
            error_type=error_type,
            retryable=retryable,
            retry_after_s=retry_after_s,
            **fields,
        )


class MalformedResponse(ProviderError):
    """Raised when the provider's answer is not a Messages API response the pool can use
    (not JSON, wrong types, too large); retried like a 5xx."""

    retryable = True


class ToolError(AgentPoolError):
    """Raised inside the tool pool when a tool call fails; becomes an `is_error` tool_result."""

    def __init__(self, message: str, *, tool: str, kind: ToolErrorKind = ToolErrorKind.ERROR, **fields: Any) -> None:
        super().__init__(message, tool=tool, kind=kind, **fields)


class WorkerFailed(AgentPoolError):
    """Raised in the scheduler when a worker's run of a task raised instead of returning its
    record (a bug of ours); the task ends `failed`, saying what the worker raised."""


class StoreError(AgentPoolError):
    """Raised when Redis refuses a request or answers something the store did not expect."""


class StoreUnavailable(StoreError):
    """Raised when Redis cannot be reached (refused, timed out, gone); `url` names it, masked."""

    retryable = True


ALL_ERRORS: tuple[type[AgentPoolError], ...] = (
    AgentPoolError,
    RetryLater,
    Overloaded,
    Draining,
    BudgetExceeded,
    ConfigError,
    InvalidConfig,
    InvalidTask,
    InvalidTaskInput,
    InjectionDetected,
    UnknownTenant,
    UnknownTool,
    PoolNotRunning,
    ProviderError,
    MalformedResponse,
    ToolError,
    WorkerFailed,
    StoreError,
    StoreUnavailable,
)
