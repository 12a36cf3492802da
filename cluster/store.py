"""The Redis result store: the exactly-once final record, the results stream, the events.

`ResultStore` is the asyncio side used inside actors; `ResultsReader` the blocking side a
user's process reads results with.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import redis
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from agentpool.models import AgentResult
from cluster.keys import Keys

# Writes the final record and its stream entry in one atomic step, only if no record exists
# for this task_id yet. A task that ran twice (after a crash, or submitted twice) therefore
# yields one record and one stream entry; the loser gets the winner's record back, so every
# caller returns the same result. Both keys carry the tenant hash tag: one slot in a cluster.
_WRITE_ONCE = """
local existing = redis.call('GET', KEYS[1])
if existing then return {0, existing} end
if tonumber(ARGV[4]) > 0 then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[4])
else
  redis.call('SET', KEYS[1], ARGV[1])
end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*', 'task_id', ARGV[2], 'status', ARGV[3], 'result', ARGV[1])
return {1, ARGV[1]}
"""


#: Events waiting for Redis, at most, per process; and how many go in one pipeline.
MAX_PENDING_EVENTS = 100_000
_EVENT_BATCH = 500


class ResultStore:
    """Async access to one pool's keys, for the scheduler and the workers."""

    def __init__(self, url: str, *, keys: Keys, result_ttl_s: int | None = None, stream_maxlen: int = 100_000) -> None:
        self.keys = keys
        self._url = url
        self._ttl = result_ttl_s or 0
        self._maxlen = stream_maxlen
        self._redis: aioredis.Redis | None = None
        self._script: Any = None
        self._events: list[tuple[str, dict[str, str]]] = []
        self._lookups: list[tuple[str, asyncio.Future[str | None]]] = []
        self._lookup_tasks: set[asyncio.Task[None]] = set()
        self._kick: asyncio.Task[None] | None = None
        self._flush_lock = asyncio.Lock()
        self.events_dropped = 0

    @property
    def redis(self) -> aioredis.Redis:
        # Created lazily, on first use, so that the client binds to the actor's event loop.
        # A blocking pool: under a burst (thousands of tasks admitted at once) callers wait for
        # a free connection instead of failing with "Too many connections".
        if self._redis is None:
            pool = aioredis.BlockingConnectionPool.from_url(
                self._url, decode_responses=True, max_connections=64, timeout=60
            )
            self._redis = aioredis.Redis(connection_pool=pool)
            self._script = self._redis.register_script(_WRITE_ONCE)
        return self._redis

    async def write_result(self, result: AgentResult) -> tuple[AgentResult, bool]:
        """Writes the final record unless one exists. Returns (the stored record, created)."""
        payload = result.model_dump_json()
        _ = self.redis
        created, stored = await self._script(
            keys=[self.keys.result(result.tenant, result.task_id), self.keys.results(result.tenant)],
            args=[payload, result.task_id, result.status, self._ttl, self._maxlen],
        )
        if created:
            return result, True
        return AgentResult.model_validate_json(stored), False

    async def get_result(self, tenant: str, task_id: str) -> AgentResult | None:
        """The task's final record, if one exists. Lookups made in the same turn of the event
        loop (a batch arriving at the scheduler) share one pipelined round trip."""
        future: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self._lookups.append((self.keys.result(tenant, task_id), future))
        if len(self._lookups) == 1:
            asyncio.get_running_loop().call_soon(self._start_lookups)
        raw = await future
        return AgentResult.model_validate_json(raw) if raw else None

    def _start_lookups(self) -> None:
        batch, self._lookups = self._lookups, []
        task = asyncio.get_running_loop().create_task(self._lookup(batch))
        self._lookup_tasks.add(task)  # the loop keeps only weak references to tasks
        task.add_done_callback(self._lookup_tasks.discard)

    async def _lookup(self, batch: list[tuple[str, asyncio.Future[str | None]]]) -> None:
        try:
            pipe = self.redis.pipeline(transaction=False)
            for key, _ in batch:
                pipe.get(key)
            values = await pipe.execute()
        except Exception as exc:  # every caller of this batch gets the error
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, future), value in zip(batch, values, strict=True):
            if not future.done():
                future.set_result(value)

    async def emit(self, tenant: str, event: str, *, task_id: str, trace_id: str, **fields: Any) -> None:
        """Queues one structured event for the tenant's events stream.

        Events leave in pipelined batches, in order: those emitted in one turn of the event
        loop go out together right after it, and `flush` sends the rest at once (the worker
        calls it before returning a task's result, so a result's events are in Redis by then).
        While Redis is unreachable they wait here, up to `MAX_PENDING_EVENTS`; beyond that the
        oldest are dropped and counted in `events_dropped`.
        """
        entry = {
            "event": event,
            "task_id": task_id,
            "trace_id": trace_id,
            "ts": f"{time.time():.6f}",
            "data": json.dumps(fields, default=str, separators=(",", ":")),
        }
        self._events.append((self.keys.events(tenant), entry))
        if len(self._events) > MAX_PENDING_EVENTS:
            del self._events[0]
            self.events_dropped += 1
        if self._kick is None:
            self._kick = asyncio.get_running_loop().create_task(self.flush())

    @property
    def pending_events(self) -> int:
        return len(self._events)

    async def flush(self) -> None:
        """Sends every queued event; leaves them queued (for the next flush) if Redis fails."""
        async with self._flush_lock:  # one batch at a time keeps the events in order
            self._kick = None
            while self._events:
                batch = self._events[:_EVENT_BATCH]
                pipe = self.redis.pipeline(transaction=False)
                for key, entry in batch:
                    pipe.xadd(key, entry, maxlen=self._maxlen, approximate=True)
                try:
                    await pipe.execute()
                except (RedisError, OSError):
                    return
                del self._events[: len(batch)]

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None


class ResultsReader:
    """Reads one tenant's final results from Redis (blocking client, for user processes).

    Args:
        url: Redis URL (`AgentPool.redis_url`, or a tenant-scoped URL).
        tenant: Whose results to read.
        keys: The pool's key layout.
    """

    def __init__(self, url: str, tenant: str, *, keys: Keys | None = None) -> None:
        self.tenant = tenant
        self.keys = keys or Keys()
        self._redis = redis.Redis.from_url(url, decode_responses=True)
        self.stream = self.keys.results(tenant)

    def read(self, *, start: str = "-", count: int | None = None) -> Iterator[AgentResult]:
        """Yields results already in the stream, oldest first, from stream id `start`."""
        page = 1000 if count is None else min(count, 1000)
        seen = 0
        cursor = start
        while count is None or seen < count:
            entries = self._redis.xrange(self.stream, min=cursor, count=page)
            if cursor != start:
                entries = entries[1:]  # xrange's min is inclusive: skip the last one we gave
            if not entries:
                return
            for _, fields in entries:
                yield AgentResult.model_validate_json(fields["result"])
                seen += 1
                if count is not None and seen >= count:
                    return
            cursor = entries[-1][0]

    def get(self, task_id: str) -> AgentResult | None:
        raw = self._redis.get(self.keys.result(self.tenant, task_id))
        return AgentResult.model_validate_json(raw) if raw else None

    def follow(
        self,
        *,
        group: str = "agentpool-consumers",
        consumer: str | None = None,
        block_ms: int = 5000,
        idle_timeout_s: float | None = None,
    ) -> Iterator[AgentResult]:
        """Yields results through a consumer group: at-least-once, each entry acknowledged
        after the consumer's loop body has run (i.e. when the next one is requested).

        A new group starts at the beginning of the stream. Entries delivered to this consumer
        earlier but never acknowledged (it crashed) are delivered again first.

        Args:
            group: Consumer group; consumers in one group share the work.
            consumer: This consumer's name; defaults to host and process id.
            block_ms: How long each read blocks waiting for new entries.
            idle_timeout_s: Stop after this long without a new entry (None: follow forever).
        """
        consumer = consumer or f"{socket.gethostname()}-{id(self)}"
        try:
            self._redis.xgroup_create(self.stream, group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        last_new = time.monotonic()
        cursor = "0"  # first our own pending (unacknowledged) entries, then new ones
        while True:
            reply = self._redis.xreadgroup(group, consumer, {self.stream: cursor}, count=100, block=block_ms)
            entries = reply[0][1] if reply else []
            if cursor == "0" and not entries:
                cursor = ">"
                continue
            if not entries:
                if idle_timeout_s is not None and time.monotonic() - last_new >= idle_timeout_s:
                    return
                continue
            last_new = time.monotonic()
            for entry_id, fields in entries:
                yield AgentResult.model_validate_json(fields["result"])
                self._redis.xack(self.stream, group, entry_id)

    def close(self) -> None:
        self._redis.close()
