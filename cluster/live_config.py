"""A pool's live configuration in Redis (`pool.update_config`): the live fields' values
(`PoolConfig.LIVE_FIELDS`) and a version that grows by one with each change. Every process
of the pool applies it over the configuration it started with: the scheduler at boot and
when it is changed, a worker when a dispatch carries a newer version, the limiter when the
scheduler sees it behind, so a process Ray restarts with its first configuration catches up."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis

from agentpool.cluster.keys import Keys

#: What a pool that was never reconfigured reads: version 0, no change.
UNCHANGED: tuple[int, dict[str, Any]] = (0, {})


class LiveConfig:
    """Reads and writes one pool's live configuration."""

    def __init__(self, redis: Callable[[], aioredis.Redis], keys: Keys, pool: str) -> None:
        self._redis = redis
        self._key = keys.live_config(pool)

    async def save(self, fields: dict[str, Any]) -> int:
        """Stores `fields` (JSON-ready) as the new live configuration; its version."""
        async with self._redis().pipeline(transaction=True) as pipe:
            pipe.hincrby(self._key, "version", 1)
            pipe.hset(self._key, "fields", json.dumps(fields, sort_keys=True))
            version, _ = await pipe.execute()
        return int(version)

    async def load(self) -> tuple[int, dict[str, Any]]:
        """The version and fields stored (`UNCHANGED` when none are)."""
        found = await self._redis().hmget(self._key, ["version", "fields"])
        if found[0] is None or found[1] is None:
            return UNCHANGED
        return int(found[0]), json.loads(found[1])

    async def save_drain(self, launch: str, until_unix: float) -> None:
        """Notes that this launch of the pool is draining, its grace period ending at
        `until_unix`: a scheduler Ray restarts reads it back and goes on draining."""
        drain = json.dumps({"launch": launch, "until_unix": until_unix})
        await self._redis().hset(self._key, "drain", drain)

    async def clear_drain(self) -> None:
        await self._redis().hdel(self._key, "drain")

    async def load_drain(self, launch: str) -> float | None:
        """When the grace period of this launch's drain ends (unix s); None if it is not
        draining. A drain noted by an earlier launch of the pool (a pool stopped after its
        drain, and this one started in its place) is dropped."""
        raw = await self._redis().hget(self._key, "drain")
        if raw is None:
            return None
        drain = json.loads(raw)
        if drain.get("launch") != launch:
            await self.clear_drain()
            return None
        return float(drain["until_unix"])

    async def version(self) -> int:
        """The stored version alone (0 when never changed)."""
        found = await self._redis().hget(self._key, "version")
        return int(found) if found is not None else 0
