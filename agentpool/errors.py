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


class QuotaExceeded(RetryLater):
    """Raised when a tenant is over one of its rate or concurrency quotas."""


class BudgetExceeded(RetryLater):
    """Raised when a tenant's daily token or cost budget is spent; retry after the reset."""


# --- failures ----------------------------------------------------------------------------


class ConfigError(AgentPoolError):
    """Raised when the pool configuration cannot work (bad URL, missing binary, no workers)."""


class InvalidTask(AgentPoolError):
    """Raised when a task is well-formed but cannot run here (unknown tool, unknown tenant)."""


class InvalidTaskInput(InvalidTask, ValueError):
    """Raised by `submit`/`enqueue` when a task is malformed or over a size bound; nothing of
    the batch is sent. `errors` lists `{index, loc, msg, type}` (the task's place in the
    batch, and pydantic's account of what is wrong, without the offending value)."""


class InjectionDetected(InvalidTask):
    """Raised (as a failed result) when the tenant's prompt-injection screen flags a task's
    input and its guardrails say `injection="block"`; `rules` names what matched."""


class UnknownTenant(InvalidTask):
    """Raised when `strict_tenants` is set and a task names a tenant with no policy."""


class UnknownTool(InvalidTask):
    """Raised when a task or a model asks for a tool that is not registered or not allowed."""


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

    def __init__(self, message: str, *, tool: str, kind: str = "error", **fields: Any) -> None:
        super().__init__(message, tool=tool, kind=kind, **fields)


class OutputValidationError(AgentPoolError):
    """Raised when a final answer does not match the task's output schema after all attempts."""


class StoreError(AgentPoolError):
    """Raised when Redis cannot be reached or answers something the store did not expect."""


ALL_ERRORS: tuple[type[AgentPoolError], ...] = (
    AgentPoolError,
    RetryLater,
    Overloaded,
    QuotaExceeded,
    BudgetExceeded,
    ConfigError,
    InvalidTask,
    InvalidTaskInput,
    InjectionDetected,
    UnknownTenant,
    UnknownTool,
    PoolNotRunning,
    ProviderError,
    MalformedResponse,
    ToolError,
    OutputValidationError,
    StoreError,
)
