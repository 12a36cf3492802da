"""The response cache in Redis: one key per kept response, in its tenant's slot, living the
tenant's `cache_ttl_s`. Hits, misses and what the hits saved are counted in the tenant's
usage hash of the day (`cluster.budgets`), beside its spend: `status()` shows them with
`budgets_today`, and `agentpool cost` over a period."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import redis.asyncio as aioredis

from agentpool.cluster.budgets import DAY_KEY_TTL_S, utc_day
from agentpool.cluster.keys import Keys

#: A kept response is bounded like a provider's (a 64k-token answer is about 256 KB).
MAX_ENTRY_BYTES = 1024 * 1024


@dataclass(frozen=True)
class Kept:
    """A response found in the cache: the provider's message, the model that answered, and
    what the call cost when it was made."""

    message: dict[str, Any]
    model: str
    cost_usd: float


class ResponseCache:
    """Finds and keeps one pool's cached responses."""

    def __init__(self, redis: Callable[[], aioredis.Redis], keys: Keys, *, wall_clock: Callable[[], float]) -> None:
        self._redis = redis
        self._keys = keys
        self._now = wall_clock

    async def find(self, tenant: str, digest: str) -> Kept | None:
        """The kept response under `digest`, counting the lookup as a hit or a miss."""
        raw = await self._redis().get(self._keys.response(tenant, digest))
        kept = _parse(raw)
        pipe = self._redis().pipeline(transaction=False)
        day = self._keys.usage(tenant, utc_day(self._now()))
        pipe.hincrby(day, "cache_hits" if kept else "cache_misses", 1)
        if kept is not None:
            pipe.hincrbyfloat(day, "cache_saved_usd", kept.cost_usd)
        pipe.expire(day, DAY_KEY_TTL_S)
        await pipe.execute()
        return kept

    async def keep(self, tenant: str, digest: str, kept: Kept, ttl_s: int) -> bool:
        """Keeps a response for `ttl_s` (never one over `MAX_ENTRY_BYTES`); False if not kept."""
        body = json.dumps({"message": kept.message, "model": kept.model, "cost_usd": kept.cost_usd})
        if len(body) > MAX_ENTRY_BYTES:
            return False
        await self._redis().set(self._keys.response(tenant, digest), body, ex=ttl_s)
        return True


def _parse(raw: Any) -> Kept | None:
    if raw is None:
        return None
    try:
        data = cast(dict[str, Any], json.loads(raw))
        return Kept(message=dict(data["message"]), model=str(data["model"]), cost_usd=float(data["cost_usd"]))
    except (ValueError, KeyError, TypeError):  # not ours, or damaged: a miss, never a crash
        return None
