"""Webhooks in Redis: each tenant's endpoints, and the deliveries of their messages.

Messages come from the tenant's results stream itself, read through a consumer group of the
pool's deliverers: a final record is in that stream once, when it is written, so a delivery
needs nothing from the workers, and an entry read but not yet turned into deliveries (its
deliverer died) is read again. Each delivery (one message to one endpoint, id
`<endpoint>:<task_id>`) is a job in a hash plus its due time in a sorted set; a deliverer
claims due jobs by pushing their due time past a lease, so a job whose deliverer dies is
claimed again when the lease ends: at least once, never lost.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from agentpool.cluster.keys import Keys, stream_entries
from agentpool.cluster.slots import axreadgroup

# Claims up to ARGV[3] jobs due by ARGV[1]: their due time moves to ARGV[2] (the lease).
_CLAIM = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
if #ids == 0 then return {} end
local out = {}
for _, id in ipairs(ids) do
  redis.call('ZADD', KEYS[1], ARGV[2], id)
  local job = redis.call('HGET', KEYS[2], id)
  if job then table.insert(out, job) else redis.call('ZREM', KEYS[1], id) end
end
return out
"""
#: Dead letters kept per tenant (about).
_DEAD_MAXLEN = 10_000
#: Attempts kept in one run's delivery log.
_LOG_MAX = 200


class WebhookStore:
    def __init__(self, redis: aioredis.Redis, keys: Keys, pool: str) -> None:
        self.redis = redis
        self.keys = keys
        self.group = f"webhooks-{pool}"
        self._claim = redis.register_script(_CLAIM)

    # --- endpoints -----------------------------------------------------------------------

    async def add(self, tenant: str, url: str, events: Sequence[str], description: str, secret: str) -> dict[str, Any]:
        """Registers an endpoint; its messages start with the results (and, for an endpoint
        of other events, the tenant's events) written from now on."""
        endpoint: dict[str, Any] = {
            "id": f"ep_{secrets.token_hex(8)}",
            "url": url,
            "events": list(events),
            "description": description,
            "created_unix": round(time.time(), 3),
            "secret": secret,
        }
        for stream in self.streams_of(tenant, events):
            try:
                await self.redis.xgroup_create(stream, self.group, id="$", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(self.keys.webhooks(tenant), endpoint["id"], json.dumps(endpoint))
        pipe.sadd(self.keys.webhook_tenants(), tenant)
        await pipe.execute()
        return endpoint

    async def endpoints(self, tenant: str) -> list[dict[str, Any]]:
        """The tenant's endpoints, secrets included (the caller decides what to show)."""
        stored = await self.redis.hvals(self.keys.webhooks(tenant))
        return sorted((json.loads(raw) for raw in stored), key=lambda e: e["created_unix"])

    async def remove(self, tenant: str, endpoint_id: str) -> bool:
        removed = bool(await self.redis.hdel(self.keys.webhooks(tenant), endpoint_id))
        if removed and not await self.redis.hlen(self.keys.webhooks(tenant)):
            await self.redis.srem(self.keys.webhook_tenants(), tenant)
        return removed

    async def tenants(self) -> list[str]:
        return sorted(str(t) for t in await self.redis.smembers(self.keys.webhook_tenants()))

    def streams_of(self, tenant: str, events: Sequence[str]) -> list[str]:
        """The streams an endpoint's messages come from: the results stream for
        `run.completed`, the events stream for the others."""
        streams = []
        if "run.completed" in events:
            streams.append(self.keys.results(tenant))
        if any(e != "run.completed" for e in events):
            streams.append(self.keys.events(tenant))
        return streams

    # --- intake: results and events -> deliveries --------------------------------------

    async def read_sources(
        self, streams: Sequence[str], consumer: str, *, pending: bool, block_ms: int | None, count: int = 200
    ) -> list[tuple[str, str, dict[str, str]]]:
        """Entries of `streams` (results or events streams) for this consumer: its own
        unacknowledged ones (`pending`), or new ones, waiting up to `block_ms`. (stream,
        entry id, fields) each."""
        if not streams:
            return []
        wanted: dict[Any, Any] = {key: "0" if pending else ">" for key in streams}
        try:
            reply: Any = await axreadgroup(self.redis, self.group, consumer, wanted, count=count, block_ms=block_ms)
        except ResponseError as exc:  # a group is missing (the stream was deleted): made again
            if "NOGROUP" not in str(exc):
                raise
            for key in streams:
                try:
                    await self.redis.xgroup_create(key, self.group, id="$", mkstream=True)
                except ResponseError:
                    pass
            return []
        return [
            (str(key), entry_id, fields)
            for key, entries in reply or []
            for entry_id, fields in stream_entries(entries)
            if fields
        ]

    async def schedule(
        self, tenant: str, stream: str, entry_id: str, jobs: Sequence[dict[str, Any]], now: float
    ) -> None:
        """Records the deliveries of one entry (once: a job that exists is left as it is)
        and acknowledges the entry."""
        pipe = self.redis.pipeline(transaction=True)
        for job in jobs:
            pipe.hsetnx(self.keys.webhook_jobs(tenant), job["id"], json.dumps(job))
            pipe.zadd(self.keys.webhook_due(tenant), {job["id"]: now}, nx=True)
        pipe.xack(stream, self.group, entry_id)
        await pipe.execute()

    # --- dispatch ------------------------------------------------------------------------

    async def claim(self, tenant: str, now: float, lease_s: float, limit: int) -> list[dict[str, Any]]:
        """Up to `limit` of the tenant's due deliveries, leased to this deliverer."""
        keys = [self.keys.webhook_due(tenant), self.keys.webhook_jobs(tenant)]
        found = await self._claim(keys=keys, args=[now, now + lease_s, limit])
        return [json.loads(raw) for raw in found or []]

    async def settle(
        self,
        tenant: str,
        job: dict[str, Any],
        attempt: dict[str, Any],
        *,
        retry_at: float | None,
        dead: bool,
        ttl_s: int,
    ) -> None:
        """Logs one attempt, then: the job is done (delivered, or `dead`: a dead letter), or
        due again at `retry_at`."""
        log = self.keys.webhook_log(tenant, job["task_id"])
        pipe = self.redis.pipeline(transaction=True)
        pipe.rpush(log, json.dumps(attempt))
        pipe.ltrim(log, -_LOG_MAX, -1)
        pipe.expire(log, ttl_s)
        if retry_at is not None:
            pipe.hset(self.keys.webhook_jobs(tenant), job["id"], json.dumps(job))
            pipe.zadd(self.keys.webhook_due(tenant), {job["id"]: retry_at})
        else:
            pipe.zrem(self.keys.webhook_due(tenant), job["id"])
            pipe.hdel(self.keys.webhook_jobs(tenant), job["id"])
            if dead:
                entry: dict[Any, Any] = {
                    "job": json.dumps({k: v for k, v in job.items() if k != "body"}),
                    "error": str(attempt["error"]),
                }
                pipe.xadd(self.keys.webhook_dead(tenant), entry, maxlen=_DEAD_MAXLEN, approximate=True)
        await pipe.execute()

    async def log(self, tenant: str, task_id: str) -> list[dict[str, Any]]:
        """Every delivery attempt of the run's messages, oldest first."""
        return [json.loads(raw) for raw in await self.redis.lrange(self.keys.webhook_log(tenant, task_id), 0, -1)]

    async def dead_letters(self, tenant: str, count: int = 100) -> list[dict[str, Any]]:
        entries = stream_entries(await self.redis.xrevrange(self.keys.webhook_dead(tenant), count=count))
        return [{"id": i, "error": f.get("error"), **json.loads(f["job"])} for i, f in entries]

    async def pending(self, tenant: str) -> int:
        """Deliveries of the tenant not yet done."""
        return int(await self.redis.zcard(self.keys.webhook_due(tenant)))
