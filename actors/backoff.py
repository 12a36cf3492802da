"""Which provider errors to retry, and how long to wait before the next attempt."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

import anthropic

from agentpool.config import RetryPolicy
from agentpool.errors import MalformedResponse

#: What to do after a failed attempt: try the same model again, move to the next model in
#: the chain, or give up on the task.
Action = Literal["retry", "fallback", "fail"]


@dataclass(frozen=True)
class Decision:
    action: Action
    status_code: int | None
    error_type: str
    message: str
    retry_after_s: float | None = None


def retry_after_s(headers: object) -> float | None:
    """The provider's requested wait: `retry-after-ms` first (more precise), else `retry-after`."""
    get = getattr(headers, "get", None)
    if get is None:
        return None
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        raw = get(name)
        if raw is None:
            continue
        try:
            value = float(raw) * scale
        except ValueError:
            continue  # an HTTP date; rare from Anthropic, and backoff covers it
        if 0 <= value <= 600:
            return value
    return None


def classify(exc: BaseException) -> Decision:
    """Maps an SDK exception to an action.

    Never retried: 400/413 (the request itself is wrong), 401/403 (credentials). A 404
    (model not found) moves on to the next model. 408/409/429/5xx/529, connection errors
    and malformed responses are retried unless the server says `x-should-retry: false`.
    """
    if isinstance(exc, anthropic.APIStatusError):
        status = exc.status_code
        headers = exc.response.headers
        err_type = getattr(exc, "type", None) or type(exc).__name__
        message = getattr(exc, "api_message", None) or str(exc)
        should = headers.get("x-should-retry")
        if status in (400, 401, 403, 413, 422):
            action: Action = "fail"
        elif status == 404:
            action = "fallback"
        elif should == "false":
            action = "fallback"
        elif status in (408, 409, 429) or status >= 500 or should == "true":
            action = "retry"
        else:
            action = "fail"
        return Decision(action, status, str(err_type), message[:1000], retry_after_s(headers))
    if isinstance(exc, MalformedResponse):  # like a 5xx: the provider may answer properly next time
        return Decision("retry", None, "MalformedResponse", exc.message[:1000])
    if isinstance(exc, anthropic.APITimeoutError | anthropic.APIConnectionError):
        return Decision("retry", None, type(exc).__name__, f"{exc} ({_endpoint(exc)})"[:1000])
    return Decision("fail", None, type(exc).__name__, str(exc)[:1000])


def _endpoint(exc: anthropic.APIConnectionError) -> str:
    """Which provider URL could not be reached: scheme, host, port and path, never a query."""
    try:
        url = exc.request.url
    except (AttributeError, RuntimeError):  # raised before a request existed
        return "no request was made"
    port = f":{url.port}" if url.port else ""
    return f"calling {url.scheme}://{url.host}{port}{url.path}"


class Backoff:
    """Exponential backoff with jitter, never shorter than the server's `retry-after`."""

    def __init__(self, policy: RetryPolicy, rng: random.Random | None = None) -> None:
        self.policy = policy
        self._rng = rng or random.Random()

    def delay_s(self, attempt: int, server_wait_s: float | None) -> float:
        """Wait before attempt `attempt + 1`, where `attempt` counts from 1."""
        p = self.policy
        ceiling = min(p.max_delay_s, p.base_delay_s * 2 ** (attempt - 1))
        delay = ceiling * (1 - p.jitter * self._rng.random())
        return max(float(delay), server_wait_s or 0.0)
