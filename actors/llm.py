"""One logical LLM call: attempts, retries and model fallback around `AsyncAnthropic`.

The SDK's own retries are off (`max_retries=0`) so that every attempt passes through here
and, later, through the rate limiter; the retry rules live in `backoff.py`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Protocol

import anthropic

from agentpool import events
from agentpool import telemetry as tm
from agentpool.actors.backoff import Backoff, classify
from agentpool.actors.response import parse_message
from agentpool.errors import MalformedResponse, ProviderError
from agentpool.events import Emit
from agentpool.models import Usage
from agentpool.pricing import PriceTable
from agentpool.secrets import Scrubber
from agentpool.vocabulary import Lane

Sleep = Callable[[float], Awaitable[None]]
#: A streamed call's text reaches the events in pieces of at least this many characters, or
#: after this long, and in at most this many events per attempt.
_DELTA_CHARS, _DELTA_S, _MAX_DELTAS = 200, 0.25, 200


class CallGate(Protocol):
    """What every attempt passes through: rate permits and budget reservations.

    `before` may wait (rate limits) or raise `BudgetExceeded`; exactly one of `after` (the
    attempt ended, with the response's usage or without one) and `abandon` (cancelled
    mid-flight) follows every `before` that returned.
    """

    async def before(self, model: str, request: dict[str, Any]) -> Any: ...

    async def after(
        self,
        ticket: Any,
        *,
        usage: dict[str, Any] | None,
        headers: Mapping[str, str] | None,
        retry_after_s: float | None,
    ) -> None: ...

    def abandon(self, ticket: Any) -> None: ...


@dataclass(frozen=True)
class LLMResponse:
    message: dict[str, Any]
    model: str
    attempts: int
    latency_ms: float
    #: Answered from the response cache: no provider call was made.
    cached: bool = False
    #: Answered through the Message Batches API (priced at batch prices).
    lane: Lane = Lane.REALTIME


def priced_usage(response: LLMResponse, prices: PriceTable) -> Usage:
    """What a response cost the task: its usage at `prices`; for one answered from the
    response cache, nothing spent and what it would have cost saved."""
    usage = prices.priced(
        response.model, Usage.from_api(response.message.get("usage")), batch=response.lane == Lane.BATCH
    )
    return Usage(cached_responses=1, saved_usd=usage.cost_usd) if response.cached else usage


class LLMClient:
    """Sends Messages API requests with our retry policy and a model fallback chain."""

    def __init__(
        self,
        client: anthropic.AsyncAnthropic,
        backoff: Backoff,
        *,
        clock: Callable[[], float],
        sleep: Sleep = asyncio.sleep,
        scrub: Callable[[str], str] | None = None,
    ) -> None:
        self._client = client
        #: Every provider message passes it before it is kept anywhere (events, spans, results).
        self._scrub = scrub or Scrubber()
        url = getattr(client, "base_url", None)
        self._server = (str(url.host), int(url.port or (443 if url.scheme == "https" else 80))) if url else None
        self._backoff = backoff
        self._clock = clock
        self._sleep = sleep

    @property
    def sdk(self) -> anthropic.AsyncAnthropic:
        """The SDK client every attempt goes through (the batch lane shares it)."""
        return self._client

    async def create(
        self,
        request: dict[str, Any],
        models: list[str],
        emit: Emit,
        gate: CallGate | None = None,
        *,
        stream: bool = False,
    ) -> LLMResponse:
        """Returns the first successful response along the model chain.

        Every attempt, retries included, passes `gate` (rate permits, budgets) before it is sent.
        With `stream`, each attempt uses the streaming Messages API and its text reaches
        `emit` as `text_delta` events as it comes (coalesced, bounded); the response and its
        usage are the same as without.

        Raises:
            ProviderError: When the error is not retryable, or every model's attempts failed.
            BudgetExceeded: When the gate finds the tenant's daily budget spent.
        """
        attempts = 0
        last: ProviderError | None = None
        max_attempts = self._backoff.policy.max_attempts_per_model
        for index, model in enumerate(models):
            if index > 0:
                reason = last.message if last else ""
                await emit(events.Fallback(from_model=models[index - 1], to_model=model, reason=reason))
            for attempt in range(1, max_attempts + 1):
                attempts += 1
                ticket = await gate.before(model, request) if gate is not None else None
                started = self._clock()
                span = tm.ChatSpan(model, request, self._server)
                try:
                    if stream:
                        body, headers = await self._streamed(request, model, attempts, emit)
                    else:
                        raw = await self._client.messages.with_raw_response.create(**request, model=model)
                        # Read as JSON and checked here, not built by the SDK, which does not validate.
                        body, headers = parse_message(raw.http_response.content, model=model), raw.headers
                except (anthropic.APIError, OSError, MalformedResponse) as exc:
                    decision = classify(exc)
                    decision = replace(decision, message=self._scrub(decision.message))
                    span.failed(decision.error_type or type(exc).__name__, decision.message)
                    if gate is not None:
                        response = getattr(exc, "response", None)
                        await gate.after(
                            ticket,
                            usage=None,
                            headers=response.headers if response is not None else None,
                            retry_after_s=(decision.retry_after_s or 1.0) if decision.status_code == 429 else None,
                        )
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
                        events.Retry(
                            model=model,
                            attempt=attempt,
                            status=decision.status_code,
                            error_type=decision.error_type,
                            delay_s=round(delay, 3),
                        )
                    )
                    await self._sleep(delay)
                    continue
                except BaseException as exc:  # cancelled (task timeout) while the request was in flight
                    span.failed(type(exc).__name__, "the attempt was abandoned")
                    if gate is not None:
                        gate.abandon(ticket)
                    raise
                latency_ms = (self._clock() - started) * 1000
                span.succeeded(body)
                if gate is not None:
                    await gate.after(ticket, usage=body.get("usage"), headers=headers, retry_after_s=None)
                return LLMResponse(body, model, attempts, latency_ms)
        assert last is not None  # the loop ran at least once and only breaks after a failure
        raise last

    async def _streamed(
        self, request: dict[str, Any], model: str, attempt: int, emit: Emit
    ) -> tuple[dict[str, Any], Mapping[str, str]]:
        """One attempt through the streaming API: its text goes to `emit` in pieces of at
        least `_DELTA_CHARS` characters or `_DELTA_S` seconds (at most `_MAX_DELTAS` events;
        the rest comes with the response); returns the final message, checked, and the
        response's headers."""
        pieces: list[str] = []
        sent, last = 0, self._clock()

        async def flush() -> None:
            nonlocal sent, last
            if pieces and sent < _MAX_DELTAS:
                await emit(events.TextDelta(model=model, attempt=attempt, text=self._scrub("".join(pieces))))
                sent += 1
            pieces.clear()
            last = self._clock()

        async with self._client.messages.stream(**request, model=model) as messages:
            async for event in messages:
                if event.type == "text":
                    pieces.append(event.text)
                    if sum(map(len, pieces)) >= _DELTA_CHARS or self._clock() - last >= _DELTA_S:
                        await flush()
            await flush()
            final = await messages.get_final_message()
            headers = messages.response.headers
        return parse_message(final.to_json().encode(), model=model), headers
