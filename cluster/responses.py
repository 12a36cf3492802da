"""The response cache in Redis: one key per kept response, in its tenant's slot, living the
tenant's `cache_ttl_s`. Hits, misses and what the hits saved are counted in the tenant's
usage hash of the day (`cluster.budgets`), beside its spend: `status()` shows them with
`budgets_today`, and `agentpool cost` over a period."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from agentpool.cluster.budgets import DAY_KEY_TTL_S, utc_day
from agentpool.cluster.connection import Pipelined, Scripted, raised
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


#: KEYS[1] the response, KEYS[2] the tenant's usage hash of the day; ARGV[1] its TTL. The
#: lookup and its count in one step: a hit (a kept response with its cost) adds to
#: `cache_hits` and `cache_saved_usd`, anything else to `cache_misses` and reads as nothing.
_FIND = """
local raw = redis.call('GET', KEYS[1])
local cost = nil
if raw then
  local ok, kept = pcall(cjson.decode, raw)
  if ok and type(kept) == 'table' and kept['message'] and kept['model'] then cost = tonumber(kept['cost_usd']) end
end
if cost then
  redis.call('HINCRBY', KEYS[2], 'cache_hits', 1)
  redis.call('HINCRBYFLOAT', KEYS[2], 'cache_saved_usd', tostring(cost))
else
  redis.call('HINCRBY', KEYS[2], 'cache_misses', 1)
  raw = false
end
redis.call('EXPIRE', KEYS[2], ARGV[1])
return raw
"""


class ResponseCache:
    """Finds and keeps one pool's cached responses. Each lookup or write goes with the
    process's next batch of Redis writes (`pipelined`: `StoreBase._pipelined`)."""

    def __init__(self, pipelined: Pipelined, keys: Keys, *, wall_clock: Callable[[], float]) -> None:
        self._pipelined = pipelined
        self._keys = keys
        self._now = wall_clock

    async def find(self, tenant: str, digest: str) -> Kept | None:
        """The kept response under `digest`, counting the lookup as a hit or a miss."""
        day = self._keys.usage(tenant, utc_day(self._now()))
        script = Scripted(_FIND, (self._keys.response(tenant, digest), day), (DAY_KEY_TTL_S,))

        def add(pipe: Any) -> int:
            script.add_to(pipe)
            return 1

        [raw] = await self._pipelined(add)
        return _parse(raised(raw))

    async def keep(self, tenant: str, digest: str, kept: Kept, ttl_s: int) -> bool:
        """Keeps a response for `ttl_s` (never one over `MAX_ENTRY_BYTES`); False if not kept."""
        body = json.dumps({"message": kept.message, "model": kept.model, "cost_usd": kept.cost_usd})
        if len(body) > MAX_ENTRY_BYTES:
            return False
        key = self._keys.response(tenant, digest)

        def add(pipe: Any) -> int:
            pipe.set(key, body, ex=ttl_s)
            return 1

        [done] = await self._pipelined(add)
        raised(done)
        return True


def _parse(raw: Any) -> Kept | None:
    if raw is None:
        return None
    try:
        data = cast(dict[str, Any], json.loads(raw))
        return Kept(message=dict(data["message"]), model=str(data["model"]), cost_usd=float(data["cost_usd"]))
    except (ValueError, KeyError, TypeError):  # not ours, or damaged: a miss, never a crash
        return None
