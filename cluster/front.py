"""The HTTP front door's Redis access (async, one client per Serve replica): final records
and a task's events followed live, `Idempotency-Key` records, and HTTP batches' members."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from agentpool.cluster.keys import Keys, stream_entries
from agentpool.cluster.slots import axread
from agentpool.events import EventEntry
from agentpool.vocabulary import EventType

#: Keys read per MGET when a batch's records are fetched.
_CHUNK = 1000
#: Entries read per XRANGE of a task's events.
_PAGE = 500
#: The events a task's record is written with (its last): a follower that reads one is done.
_FINAL_EVENTS = frozenset({EventType.TASK_END, EventType.SHED, EventType.TASK_REJECTED})


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


def _entry_order(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


class _Subscription:
    """One follower of one stream: woken when the hub sees new entries in it."""

    def __init__(self, key: str) -> None:
        self.key = key
        self._event = asyncio.Event()

    def wake(self) -> None:
        self._event.set()

    async def wait(self) -> None:
        await self._event.wait()
        self._event.clear()


class EventHub:
    """Watches every stream this process follows with one blocking XREAD at a time, and
    wakes the followers of a stream that got new entries (they read them themselves).

    Each read waits at most `block_ms`, then takes in the streams followed since; a stream
    followed since its last read is caught up by its follower, so nothing is missed."""

    def __init__(self, redis: aioredis.Redis, block_ms: int = 250) -> None:
        self._redis = redis
        self._block_ms = block_ms
        self._subs: dict[str, set[_Subscription]] = {}
        #: The newest entry id the hub has seen, per stream.
        self._seen: dict[str, str] = {}
        self._task: asyncio.Task[None] | None = None

    def subscribe(self, key: str, cursor: str) -> _Subscription:
        sub = _Subscription(key)
        self._subs.setdefault(key, set()).add(sub)
        self.advance(key, cursor)
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._watch())
        return sub

    def advance(self, key: str, cursor: str) -> None:
        """A follower of `key` has read up to `cursor`: the hub watches for what comes after."""
        seen = self._seen.get(key)
        if seen is None or _entry_order(cursor) > _entry_order(seen):
            self._seen[key] = cursor

    def unsubscribe(self, sub: _Subscription) -> None:
        subs = self._subs.get(sub.key)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self._subs[sub.key]
                self._seen.pop(sub.key, None)

    async def _watch(self) -> None:
        while self._subs:
            streams: dict[Any, Any] = {key: self._seen.get(key, "0-0") for key in self._subs}
            try:
                reply: Any = await axread(self._redis, streams, count=1, block_ms=self._block_ms)
            except (aioredis.RedisError, OSError):
                await asyncio.sleep(0.5)  # the followers read, and fail, themselves
                continue
            for key, entries in reply or []:
                found = stream_entries(entries)
                if found and key in self._subs:
                    self.advance(key, found[-1][0])
                    for sub in self._subs[key]:
                        sub.wake()


class FrontStore:
    def __init__(self, redis: aioredis.Redis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys
        #: One blocking read for every task stream followed in this process.
        self.hub = EventHub(redis)

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
        and every event written with it has been given.

        What is in the stream already is read at once; live events come through this
        process's `EventHub` (one blocking read for every stream followed here, so a
        thousand followers hold one Redis connection, not a thousand)."""
        key = self.keys.task_events(tenant, task_id)
        cursor = after
        subscription = self.hub.subscribe(key, cursor)
        try:
            while True:
                entries = await self._read_after(key, cursor)
                if not entries:  # caught up: wait for the hub, or the record
                    if await self.redis.exists(self.keys.result(tenant, task_id)):
                        entries = await self._read_after(key, cursor)  # written with the record
                        if entries:
                            yield entries
                        return
                    try:
                        async with asyncio.timeout(block_ms / 1000):
                            await subscription.wait()
                    except TimeoutError:
                        yield []  # idle: the caller may send a heartbeat
                    continue
                cursor = entries[-1].id
                self.hub.advance(key, cursor)
                yield entries
                # A task's last events are written with its record, in one step: once one of
                # them is read (and the record is there), everything has been given.
                final = any(e.event in _FINAL_EVENTS for e in entries)
                if final and len(entries) < _PAGE and await self.redis.exists(self.keys.result(tenant, task_id)):
                    return
        finally:
            self.hub.unsubscribe(subscription)

    async def _read_after(self, key: str, cursor: str) -> list[EventEntry]:
        entries = stream_entries(await self.redis.xrange(key, min=f"({cursor}", count=_PAGE))
        return [EventEntry.from_stream(i, f) for i, f in entries]

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
