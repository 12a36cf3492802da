"""One logical LLM call: attempts, retries and model fallback around `AsyncAnthropic`.

The SDK's own retries are off (`max_retries=0`) so that every attempt passes through here
and, later, through the rate limiter; the retry rules live in `backoff.py`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import anthropic

from actors.backoff import Backoff, classify
from agentpool.errors import ProviderError

Emit = Callable[..., Awaitable[None]]
Sleep = Callable[[float], Awaitable[None]]


@dataclass(frozen=True)
class LLMResponse:
    message: dict[str, Any]
    model: str
    attempts: int
    latency_ms: float


class LLMClient:
    """Sends Messages API requests with our retry policy and a model fallback chain."""

    def __init__(
        self,
        client: anthropic.AsyncAnthropic,
        backoff: Backoff,
        *,
        clock: Callable[[], float],
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self._client = client
        self._backoff = backoff
        self._clock = clock
        self._sleep = sleep

    async def create(self, request: dict[str, Any], models: list[str], emit: Emit) -> LLMResponse:
        """Returns the first successful response along the model chain.

        Raises:
            ProviderError: When the error is not retryable, or every model's attempts failed.
        """
        attempts = 0
        last: ProviderError | None = None
        max_attempts = self._backoff.policy.max_attempts_per_model
        for index, model in enumerate(models):
            if index > 0:
                await emit(
                    "fallback", from_model=models[index - 1], to_model=model, reason=last.message if last else ""
                )
            for attempt in range(1, max_attempts + 1):
                attempts += 1
                started = self._clock()
                try:
                    message = await self._client.messages.create(**request, model=model)
                except (anthropic.APIError, OSError) as exc:
                    decision = classify(exc)
                    last = ProviderError(
                        f"{decision.error_type}: {decision.message}",
                        status_code=decision.status_code,
                        error_type=decision.error_type,
                        retryable=decision.action != "fail",
                        retry_after_s=decision.retry_after_s,
                        attempts=attempts,
                    )
                    if decision.action == "fail":
                        raise last from None
                    if decision.action == "fallback" or attempt == max_attempts:
                        break
                    delay = self._backoff.delay_s(attempt, decision.retry_after_s)
                    await emit(
                        "retry",
                        model=model,
                        attempt=attempt,
                        status=decision.status_code,
                        error_type=decision.error_type,
                        delay_s=round(delay, 3),
                    )
                    await self._sleep(delay)
                    continue
                latency_ms = (self._clock() - started) * 1000
                return LLMResponse(message.model_dump(mode="json", exclude_none=True), model, attempts, latency_ms)
        assert last is not None  # the loop ran at least once and only breaks after a failure
        raise last
