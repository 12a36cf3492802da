"""The Redis result store: the exactly-once final record, the results stream, the events.

`ResultStore` is the asyncio side used inside actors; `cluster.reader.ResultsReader` the
blocking side a user's process reads results with.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, cast

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import RedisError
from redis.typing import EncodableT, FieldT

from agentpool.background import Background
from agentpool.cluster.acl import display_url
from agentpool.cluster.keys import Keys
from agentpool.config import PoolConfig
from agentpool.errors import StoreError
from agentpool.events import Event
from agentpool.models import AgentResult, AgentTask
from agentpool.redact import redact, redact_text

#: One JSON line per structured event, when `PoolConfig.event_log` is on.
EVENT_LOG = logging.getLogger("agentpool.events")
log = logging.getLogger("agentpool.store")

# Writes the final record and its stream entry in one atomic step, only if no record exists
# for this task_id yet. A task that ran twice (after a crash, or submitted twice) therefore
# yields one record and one stream entry; the loser gets the winner's record back, so every
# caller returns the same result. Either way the task leaves the pool's admissions and its
# transient keys (checkpoint, lease, cancel flag, approval) go. Every key carries the
# tenant's hash tag: one slot in a cluster.
_WRITE_ONCE = """
redis.call('HDEL', KEYS[3], ARGV[2])
redis.call('DEL', KEYS[4], KEYS[5], KEYS[6], KEYS[7])
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
# Records an admission unless the task already has a final record (then returns it) or was
# admitted before. Returns {record or false, 1 if admitted before}.
_ADMIT = """
local existing = redis.call('GET', KEYS[1])
if existing then return {existing, 1} end
return {false, 1 - redis.call('HSETNX', KEYS[2], ARGV[1], ARGV[2])}
"""
# Refreshes a run's lease, or deletes it (ARGV[2] == 0), only while that run holds it.
_LEASE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if tonumber(ARGV[2]) > 0 then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return redis.call('DEL', KEYS[1])
"""

#: Events waiting for Redis, at most, per process; and how many go in one pipeline.
MAX_PENDING_EVENTS = 100_000
_EVENT_BATCH = 500
#: Final records (and admissions) waiting for Redis, at most, per process.
MAX_PENDING_WRITES = 20_000
#: Retry delays of the outbox while Redis is away: first, growth, longest.
_RETRY_FIRST_S, _RETRY_GROWTH, _RETRY_MAX_S = 0.05, 2.0, 2.0
_REDIS_DOWN = (RedisError, OSError)


@dataclass
class RunStart:
    """What a run finds in Redis as it starts (one round trip); by default, nothing."""

    leased: bool = False
    holder: str | None = None
    checkpoint: str | None = None
    cancelled: bool = False
    approval: str | None = None
    result: AgentResult | None = None


class ResultStore:
    """Async access to one pool's keys, for the scheduler and the workers.

    While Redis is away, final records and admissions wait in an in-memory outbox (bounded
    by `MAX_PENDING_WRITES`, in order) and events in their own buffer, and a background
    task retries them with backoff; callers get their results meanwhile.
    """

    def __init__(
        self,
        url: str,
        *,
        keys: Keys,
        pool: str = "agentpool",
        result_ttl_s: int | None = None,
        stream_maxlen: int = 100_000,
        event_log: bool = False,
        audit_maxlen: int | None = None,
        pii: Callable[[str], list[str]] | None = None,
    ) -> None:
        self.keys = keys
        #: The kinds of personal data to redact from a tenant's records (its guardrails).
        self._pii = pii or (lambda tenant: [])
        self.pool = pool
        self._url = url
        self._ttl = result_ttl_s or 0
        self._maxlen = stream_maxlen
        self._event_log = event_log
        if event_log and not EVENT_LOG.handlers:  # the actor's stderr: Ray's worker log files
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter("%(message)s"))
            EVENT_LOG.addHandler(handler)
            EVENT_LOG.setLevel(logging.INFO)
            EVENT_LOG.propagate = False
        self._audit_maxlen = audit_maxlen
        self._redis: aioredis.Redis | None = None
        self._scripts: dict[str, Any] = {}
        #: (stream, entry, MAXLEN or None) in order: events and audit entries.
        self._events: list[tuple[str, dict[str, str], int | None]] = []
        self._lookups: list[tuple[AgentTask, str, asyncio.Future[tuple[str | None, bool]]]] = []
        self._background = Background()
        self._kick: asyncio.Task[None] | None = None
        self._flush_lock = asyncio.Lock()
        self._outbox: deque[AgentResult | tuple[str, str, str]] = deque()
        self._drainer: asyncio.Task[None] | None = None
        self.events_dropped = 0
        self.writes_dropped = 0
        self.writes_retried = 0
        #: When the current outage began (wall clock), and what Redis answered then.
        self.unreachable_since: float | None = None
        self.last_error: str | None = None

    @classmethod
    def for_pool(cls, url: str, config: PoolConfig) -> ResultStore:
        """The store as a pool's actors use it: layout, TTL, stream bounds and event log from `config`."""
        return cls(
            url,
            keys=Keys(config.key_prefix),
            pool=config.name,
            result_ttl_s=config.result_ttl_s,
            stream_maxlen=config.stream_maxlen,
            event_log=config.event_log,
            audit_maxlen=config.audit_maxlen,
            pii=lambda tenant: (config.policy_for(tenant) or config.default_tenant_policy).guardrails.pii,
        )

    @property
    def redis(self) -> aioredis.Redis:
        # Created lazily, on first use, so that the client binds to the actor's event loop.
        # A blocking pool: under a burst (thousands of tasks admitted at once) callers wait for
        # a free connection instead of failing with "Too many connections". A dropped
        # connection is retried briefly; a longer outage is the outbox's to ride out.
        if self._redis is None:
            pool = aioredis.BlockingConnectionPool.from_url(
                self._url,
                decode_responses=True,
                max_connections=64,
                timeout=60,
                socket_connect_timeout=2,
                socket_timeout=30,
                retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), 2),
            )
            self._redis = aioredis.Redis(connection_pool=pool)
            self._scripts = {"write": self._redis.register_script(_WRITE_ONCE)}
            self._scripts["lease"] = self._redis.register_script(_LEASE)
            self._scripts["admit"] = self._redis.register_script(_ADMIT)
        return self._redis

    # --- the final record --------------------------------------------------------------

    async def write_result(self, result: AgentResult) -> tuple[AgentResult, bool]:
        """Writes the final record unless one exists. Returns (the stored record, created).

        If Redis is unreachable the record waits in the outbox, and is reported as created:
        the caller has no other record to return. The tenant's PII redaction applies to the
        answer and the error message first; the record returned is the one written.
        """
        kinds = self._pii(result.tenant)
        if kinds:
            update: dict[str, Any] = {"answer": redact(result.answer, pii=kinds, keys=False)}
            if result.error is not None:
                update["error"] = result.error.model_copy(
                    update={"message": redact_text(result.error.message, pii=kinds)}
                )
            result = result.model_copy(update=update)
        if self._outbox:  # keep order behind what is already waiting
            self._buffer(result)
            return result, True
        try:
            return await self._write(result)
        except _REDIS_DOWN as exc:
            self._down(exc)
            self._buffer(result)
            return result, True

    async def _write(self, result: AgentResult) -> tuple[AgentResult, bool]:
        t, task_id = result.tenant, result.task_id
        _ = self.redis
        created, stored = await self._scripts["write"](
            keys=[
                self.keys.result(t, task_id),
                self.keys.results(t),
                self.keys.admitted(t, self.pool),
                *self.keys.task_keys(t, task_id),
            ],
            args=[result.model_dump_json(), task_id, result.status, self._ttl, self._maxlen],
        )
        if created:
            return result, True
        return AgentResult.model_validate_json(stored), False

    def _down(self, exc: BaseException) -> None:
        """Notes that Redis failed a write; warns once per outage."""
        self.last_error = f"{type(exc).__name__}: {exc}"[:300]
        if self.unreachable_since is None:
            self.unreachable_since = time.time()
            log.warning(
                "Redis at %s is unreachable (%s): final records and events wait in this process's memory "
                "(at most %d and %d) and are retried until it is back",
                display_url(self._url),
                self.last_error,
                MAX_PENDING_WRITES,
                MAX_PENDING_EVENTS,
            )

    def _up(self) -> None:
        if self.unreachable_since is not None:
            log.warning(
                "Redis at %s is back after %.1f s; what waited has been written",
                display_url(self._url),
                time.time() - self.unreachable_since,
            )
        self.unreachable_since = None

    def _buffer(self, item: AgentResult | tuple[str, str, str]) -> None:
        self._outbox.append(item)
        if len(self._outbox) > MAX_PENDING_WRITES:
            self._outbox.popleft()
            self.writes_dropped += 1
        if self._drainer is None or self._drainer.done():
            self._drainer = self._spawn(self._drain())

    async def _drain(self) -> None:
        delay = _RETRY_FIRST_S
        while self._outbox or self._events:
            try:
                while self._outbox:
                    item = self._outbox[0]
                    if isinstance(item, AgentResult):
                        await self._write(item)
                    else:
                        await self.redis.hsetnx(*item)
                    self._outbox.popleft()
                    self.writes_retried += 1
                await self.flush()
                if self._events:
                    raise ConnectionError("events still pending")
                delay = _RETRY_FIRST_S
            except _REDIS_DOWN as exc:
                self._down(exc)
                await asyncio.sleep(delay)
                delay = min(delay * _RETRY_GROWTH, _RETRY_MAX_S)
        self._up()

    @property
    def backlog(self) -> dict[str, int]:
        """Writes waiting for Redis and what was dropped for want of room."""
        return {
            "pending_writes": len(self._outbox),
            "pending_events": len(self._events),
            "writes_dropped": self.writes_dropped,
            "events_dropped": self.events_dropped,
        }

    async def reachable(self, timeout_s: float = 1.0) -> tuple[bool, str | None]:
        """Whether Redis answers a PING now, and if not, why (for `status()`)."""
        try:
            await asyncio.wait_for(self.redis.ping(), timeout_s)
        except (TimeoutError, *_REDIS_DOWN) as exc:
            return False, f"{type(exc).__name__}: {exc}"[:300]
        return True, None

    # --- admission ---------------------------------------------------------------------

    async def admit(self, task: AgentTask, entry: str) -> tuple[AgentResult | None, bool]:
        """Records the task as accepted by this pool (unless it already was) and looks up its
        final record. Returns (the final record or None, whether it was accepted before).

        Calls made in the same turn of the event loop (a batch arriving at the scheduler)
        share one pipelined round trip. If Redis is away the admission waits in the outbox.
        """
        future: asyncio.Future[tuple[str | None, bool]] = asyncio.get_running_loop().create_future()
        self._lookups.append((task, entry, future))
        if len(self._lookups) == 1:
            asyncio.get_running_loop().call_soon(self._start_lookups)
        raw, known = await future
        return (AgentResult.model_validate_json(raw) if raw else None), known

    def _start_lookups(self) -> None:
        batch, self._lookups = self._lookups, []
        self._spawn(self._lookup(batch))

    async def _lookup(self, batch: list[tuple[AgentTask, str, asyncio.Future[tuple[str | None, bool]]]]) -> None:
        try:
            pipe = self.redis.pipeline(transaction=False)
            for task, entry, _ in batch:
                keys = [self.keys.result(task.tenant, task.task_id), self.keys.admitted(task.tenant, self.pool)]
                await self._scripts["admit"](keys=keys, args=[task.task_id, entry], client=pipe)
            values = await pipe.execute()
        except _REDIS_DOWN as exc:
            self._down(exc)
            for task, entry, future in batch:
                self._buffer((self.keys.admitted(task.tenant, self.pool), task.task_id, entry))
                if not future.done():
                    future.set_result((None, False))
            return
        except Exception as exc:  # anything else: every caller hears of it, none waits forever
            for _, _, future in batch:
                if not future.done():
                    future.set_exception(StoreError(f"admission could not be recorded: {exc}"))
            return
        for (_, _, future), (raw, known) in zip(batch, values, strict=True):
            if not future.done():
                future.set_result((raw or None, bool(known)))

    async def admissions(self) -> AsyncIterator[tuple[str, str, str]]:
        """Every task this pool accepted and has not finished: (tenant, task_id, entry)."""
        pattern = self.keys.admitted_pattern(self.pool)
        async for key in self.redis.scan_iter(match=pattern, count=1000):
            tenant = key[key.index("{") + 1 : key.index("}")]
            async for task_id, entry in self.redis.hscan_iter(key, count=1000):
                yield tenant, task_id, entry

    # --- runs --------------------------------------------------------------------------

    async def begin(self, tenant: str, task_id: str, run_id: str, lease_ms: int) -> RunStart:
        """Takes the task's lease (unless another run holds it) and reads what an earlier run
        left: its checkpoint, a cancel request, an approval decision, or its final record."""
        checkpoint, lease, cancel, approval = self.keys.task_keys(tenant, task_id)
        pipe = self.redis.pipeline(transaction=False)
        pipe.set(lease, run_id, nx=True, px=lease_ms)
        pipe.get(lease)
        pipe.get(checkpoint)
        pipe.exists(cancel)
        pipe.get(approval)
        pipe.get(self.keys.result(tenant, task_id))
        leased, holder, saved, cancelled, decision, raw = await pipe.execute()
        return RunStart(
            leased=bool(leased),
            holder=holder,
            checkpoint=saved,
            cancelled=bool(cancelled),
            approval=decision,
            result=AgentResult.model_validate_json(raw) if raw else None,
        )

    async def renew_lease(self, tenant: str, task_id: str, run_id: str, lease_ms: int) -> bool:
        """Extends the run's lease; False if the run no longer holds it."""
        _ = self.redis
        return bool(await self._scripts["lease"](keys=[self.keys.lease(tenant, task_id)], args=[run_id, lease_ms]))

    async def release_lease(self, tenant: str, task_id: str, run_id: str) -> bool:
        """Frees the lease if this run holds it (a run whose process died, say)."""
        _ = self.redis
        return bool(await self._scripts["lease"](keys=[self.keys.lease(tenant, task_id)], args=[run_id, 0]))

    async def mark_cancelled(self, tenant: str, task_id: str, reason: str) -> None:
        """Tells a run of the task that starts or resumes later (anywhere) to end at once."""
        await self.redis.set(self.keys.cancel(tenant, task_id), reason, ex=86_400)

    async def save_checkpoint(self, tenant: str, task_id: str, payload: str, ttl_s: int) -> None:
        await self.redis.set(self.keys.checkpoint(tenant, task_id), payload, ex=ttl_s)

    # --- events ------------------------------------------------------------------------

    async def emit(self, tenant: str, event: Event, *, task_id: str, trace_id: str) -> None:
        """Queues one structured event (see `post`)."""
        self.post(tenant, event, task_id=task_id, trace_id=trace_id)

    def post(self, tenant: str, event: Event, *, task_id: str, trace_id: str) -> None:
        """Queues one structured event for the tenant's events stream.

        Events leave in pipelined batches, in order: those emitted in one turn of the event
        loop go out together right after it, and `flush` sends the rest at once (the worker
        calls it before returning a task's result, so a result's events are in Redis by then).
        While Redis is unreachable they wait here, up to `MAX_PENDING_EVENTS`, and the outbox
        retries them; beyond that the oldest are dropped and counted in `events_dropped`.
        """
        fields = event.data()
        kinds = self._pii(tenant)
        if kinds:
            fields = redact(fields, pii=kinds, keys=False, numbers=False)
        entry = {
            "event": event.TYPE.value,
            "task_id": task_id,
            "trace_id": trace_id,
            "ts": f"{time.time():.6f}",
            "data": json.dumps(fields, default=str, separators=(",", ":")),
        }
        if self._event_log:
            EVENT_LOG.info(json.dumps({"tenant": tenant, **entry, "data": fields}, default=str))
        self._queue((self.keys.events(tenant), entry, self._maxlen))

    def audit(self, tenant: str, **fields: Any) -> None:
        """Appends one entry to the tenant's append-only audit trail (`...:audit` stream; see
        `PoolConfig.audit_maxlen`). The caller redacts secrets from what it passes; the
        tenant's PII redaction applies here."""
        kinds = self._pii(tenant)
        if kinds:
            fields = redact(fields, pii=kinds, keys=False, numbers=False)
        entry = {k: v if isinstance(v, str) else json.dumps(v, default=str) for k, v in fields.items()}
        entry["ts"] = f"{time.time():.6f}"
        self._queue((self.keys.audit(tenant), entry, self._audit_maxlen))

    def _queue(self, item: tuple[str, dict[str, str], int | None]) -> None:
        self._events.append(item)
        if len(self._events) > MAX_PENDING_EVENTS:
            del self._events[0]
            self.events_dropped += 1
        if self._kick is None:
            self._kick = asyncio.get_running_loop().create_task(self.flush())

    @property
    def pending_events(self) -> int:
        return len(self._events)

    async def flush(self) -> None:
        """Sends every queued event; leaves them queued (for the outbox to retry) if Redis fails."""
        async with self._flush_lock:  # one batch at a time keeps the events in order
            self._kick = None
            while self._events:
                batch = self._events[:_EVENT_BATCH]
                pipe = self.redis.pipeline(transaction=False)
                for key, entry, maxlen in batch:
                    # redis-py types the fields as a dict of its own key and value unions.
                    fields = cast("dict[FieldT, EncodableT]", entry)
                    pipe.xadd(key, fields, maxlen=maxlen, approximate=True)
                try:
                    await pipe.execute()
                except _REDIS_DOWN as exc:
                    self._down(exc)
                    if self._drainer is None or self._drainer.done():
                        self._drainer = self._spawn(self._drain())
                    return
                del self._events[: len(batch)]

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        return self._background.spawn(coro)

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None
