"""Tool calls in Redis: the at-most-once record of each side-effecting call, and the
result cache of tools that ask for one (`@tool(cache_ttl_s=...)`).

A side-effecting call is claimed ("started") before it runs and holds its outcome after: a
re-run of its task finds the outcome and gets it back without running the tool again, or
finds only the claim (the call started and never reported back) and must not run it blind.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass

import redis.asyncio as aioredis

from agentpool.cluster.keys import Keys
from agentpool.protocol import ToolCall, ToolOutcome

#: How long a call's record (or claim) is kept: longer than any task's life.
RECORD_TTL_S = 7 * 86_400
#: The claim of a call that started and has not reported back.
STARTED = "started"


@dataclass(frozen=True)
class Claim:
    """What claiming a call found: `first` (this run made the claim), else what an earlier
    run left: its outcome, or only its claim (`outcome` None)."""

    first: bool
    outcome: ToolOutcome | None = None


class ToolRecords:
    """A worker's access to the tool-call records and the tool cache."""

    def __init__(self, redis: Callable[[], aioredis.Redis], keys: Keys) -> None:
        self._redis = redis
        self._keys = keys

    def record_key(self, call: ToolCall) -> str:
        return self._keys.tool_call(call.tenant, call.task_id, call.tool_use_id)

    async def claim(self, call: ToolCall) -> Claim:
        """Marks the call started, unless an earlier run of its task did."""
        redis, key = self._redis(), self.record_key(call)
        if await redis.set(key, STARTED, nx=True, ex=RECORD_TTL_S):
            return Claim(first=True)
        earlier = await redis.get(key)
        if earlier is None or earlier == STARTED:
            return Claim(first=False)
        return Claim(first=False, outcome=ToolOutcome.model_validate_json(earlier))

    async def release(self, call: ToolCall) -> None:
        """Takes this run's claim back: the tool never started, a later run may call it."""
        await self._redis().delete(self.record_key(call))

    async def record(self, call: ToolCall, outcome: ToolOutcome) -> None:
        """The call's outcome, for any later run of its task."""
        await self._redis().set(self.record_key(call), outcome.model_dump_json(), ex=RECORD_TTL_S)

    def cache_key(self, call: ToolCall) -> str:
        """The call's key in the tool's cache: the tool and a digest of its arguments."""
        canonical = json.dumps(call.arguments, sort_keys=True, separators=(",", ":"), default=str)
        digest = hashlib.sha256(canonical.encode()).hexdigest()[:32]
        return self._keys.tool_cache(call.tenant, call.name, digest)

    async def cached(self, key: str) -> ToolOutcome | None:
        raw = await self._redis().get(key)
        return None if raw is None else ToolOutcome.model_validate_json(raw)

    async def cache(self, key: str, outcome: ToolOutcome, ttl_s: float) -> None:
        await self._redis().set(key, outcome.model_dump_json(), ex=max(1, round(ttl_s)))
