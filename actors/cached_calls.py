"""LLM calls through the response cache (`agentpool.response_cache` for the rules,
`cluster.responses` for the storage): a call the cache may answer is looked up first, and a
complete answer from the provider is kept for the calls after it."""

from __future__ import annotations

import logging
import time
from typing import Any

from redis.exceptions import RedisError

from agentpool import telemetry as tm
from agentpool.actors.llm import LLMResponse
from agentpool.actors.session_task import CallLLM
from agentpool.cluster.responses import Kept, ResponseCache
from agentpool.events import Emit
from agentpool.models import Usage
from agentpool.pricing import PriceTable
from agentpool.response_cache import cache_key, keepable, may_use
from agentpool.vocabulary import CacheMode

log = logging.getLogger(__name__)


def through_cache(
    call: CallLLM, cache: ResponseCache, *, tenant: str, mode: CacheMode, ttl_s: int, prices: PriceTable
) -> CallLLM:
    """`call`, with the cache in front for the calls `mode` lets it answer. A hit returns the
    kept response (`cached`), with no provider call, rate permit or budget reservation. The
    cache being away makes every lookup a miss, never a failed call."""
    if mode is CacheMode.OFF:
        return call

    async def call_llm(request: dict[str, Any], models: list[str], emit: Emit) -> LLMResponse:
        if not may_use(mode, request):
            return await call(request, models, emit)
        digest = cache_key(request, models)
        started = time.monotonic()
        try:
            kept = await cache.find(tenant, digest)
        except (RedisError, OSError) as exc:
            log.warning("response cache unavailable (%s): the call goes to the provider", type(exc).__name__)
            kept = None
        tm.response_cache.add(1, {"agentpool.tenant": tenant, "result": "hit" if kept else "miss"})
        if kept is not None:
            latency_ms = (time.monotonic() - started) * 1000
            return LLMResponse(kept.message, kept.model, attempts=0, latency_ms=latency_ms, cached=True)
        response = await call(request, models, emit)
        if keepable(response.message):
            cost = prices.priced(response.model, Usage.from_api(response.message.get("usage"))).cost_usd
            try:
                await cache.keep(tenant, digest, Kept(response.message, response.model, cost), ttl_s)
            except (RedisError, OSError):  # not kept: the next call asks the provider again
                pass
        return response

    return call_llm
