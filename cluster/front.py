"""The HTTP front door's Redis access (async, one client per Serve replica): final records
and a task's events followed live, `Idempotency-Key` records, and HTTP batches' members."""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from agentpool.cluster.keys import Keys, stream_entries
from agentpool.events import EventEntry

#: Keys read per MGET when a batch's records are fetched.
_CHUNK = 1000


@dataclass(frozen=True)
class StoredResponse:
    """A response as an `Idempotency-Key` replays it: status code, JSON body, `Location`
    and `Retry-After`."""

    status_code: int
    body: Any
    location: str | None = None
    retry_after: str | None = None


class IdemState:
    """What a POST with an `Idempotency-Key` finds (`FrontStore.claim`)."""

    NEW = "new"  # the key is this request's now: handle it, then `remember` the response
    BUSY = "busy"  # a request with this key is being handled (409)
    MISMATCH = "mismatch"  # the key was used with another request (422)


class FrontStore:
    def __init__(self, redis: aioredis.Redis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys

    # --- records and events ------------------------------------------------------------

    async def result_json(self, tenant: str, task_id: str) -> str | None:
        raw = await self.redis.get(self.keys.result(tenant, task_id))
        return None if raw is None else str(raw)

    async def results_json(self, tenant: str, task_ids: Sequence[str]) -> list[str | None]:
        """The final records of `task_ids` as stored (None: none yet), in order."""
        out: list[str | None] = []
        for i in range(0, len(task_ids), _CHUNK):
            keys = [self.keys.result(tenant, t) for t in task_ids[i : i + _CHUNK]]
            out.extend(None if raw is None else str(raw) for raw in await self.redis.mget(keys))
        return out

    async def recent_results(self, tenant: str, count: int) -> list[dict[str, Any]]:
        """The tenant's newest final records, newest first (from its results stream)."""
        entries = stream_entries(await self.redis.xrevrange(self.keys.results(tenant), count=count))
        return [json.loads(fields["result"]) for _, fields in entries if "result" in fields]

    async def follow(
        self, tenant: str, task_id: str, *, after: str = "0-0", block_ms: int = 5000
    ) -> AsyncIterator[list[EventEntry]]:
        """The task's events after stream id `after`, batch by batch as they are written (an
        empty batch after each `block_ms` without any); ends once its final record exists
        and every event written with it has been given."""
        key = self.keys.task_events(tenant, task_id)
        cursor, ending, block = after, False, None
        while True:
            reply: Any = await self.redis.xread({key: cursor}, count=500, block=block)
            entries = [EventEntry.from_stream(i, f) for i, f in stream_entries(reply[0][1] if reply else None)]
            if entries:
                cursor = entries[-1].id
                yield entries
            if entries or block is not None:
                if block is not None and not entries:
                    yield []  # idle: the caller may send a heartbeat
                block = None  # at the stream's end, the record is checked before waiting
                continue
            if ending:
                return
            ending = bool(await self.redis.exists(self.keys.result(tenant, task_id)))
            block = None if ending else block_ms

    # --- Idempotency-Key -----------------------------------------------------------------

    def _idem_key(self, tenant: str, key: str) -> str:
        return self.keys.idempotency(tenant, hashlib.sha256(key.encode()).hexdigest()[:32])

    async def claim(self, tenant: str, key: str, fingerprint: str, ttl_s: int) -> str | StoredResponse:
        """Takes the key for this request (`IdemState.NEW`), or says why not: the stored
        response (replay it), `BUSY` or `MISMATCH`."""
        name = self._idem_key(tenant, key)
        claim = json.dumps({"fingerprint": fingerprint, "state": "busy"})
        if await self.redis.set(name, claim, nx=True, ex=ttl_s):
            return IdemState.NEW
        raw = await self.redis.get(name)
        if raw is None:  # expired between the two commands: take it now
            return IdemState.NEW if await self.redis.set(name, claim, nx=True, ex=ttl_s) else IdemState.BUSY
        stored = json.loads(raw)
        if stored["fingerprint"] != fingerprint:
            return IdemState.MISMATCH
        if stored["state"] == "busy":
            return IdemState.BUSY
        return StoredResponse(stored["status_code"], stored["body"], stored.get("location"))

    async def remember(self, tenant: str, key: str, fingerprint: str, response: StoredResponse, ttl_s: int) -> None:
        record = {"fingerprint": fingerprint, "state": "done", **response.__dict__}
        await self.redis.set(self._idem_key(tenant, key), json.dumps(record), ex=ttl_s)

    async def release(self, tenant: str, key: str) -> None:
        """Lets the key go (the request failed before creating anything): a retry runs."""
        await self.redis.delete(self._idem_key(tenant, key))

    # --- batches -------------------------------------------------------------------------

    async def create_batch(self, tenant: str, batch_id: str, task_ids: Sequence[str], ttl_s: int) -> None:
        key = self.keys.batch(tenant, batch_id)
        pipe = self.redis.pipeline(transaction=True)
        for i in range(0, len(task_ids), _CHUNK):
            pipe.rpush(key, *task_ids[i : i + _CHUNK])
        pipe.expire(key, ttl_s)
        await pipe.execute()

    async def batch_members(self, tenant: str, batch_id: str) -> list[str] | None:
        """The batch's task ids in input order; None if there is no such batch."""
        members = await self.redis.lrange(self.keys.batch(tenant, batch_id), 0, -1)
        return [str(m) for m in members] if members else None
