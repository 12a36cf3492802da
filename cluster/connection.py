"""The store's connection to Redis and what it does while Redis is away.

`StoreBase` is shared by the store's parts (`cluster.records`, `cluster.journal`,
`cluster.runs`, `cluster.event_log`), which `cluster.store.ResultStore` puts together: one
client per process, created on first use, the Lua scripts registered on it, and the outbox.
While Redis is away, final records and admissions wait in an in-memory outbox (bounded by
`MAX_PENDING_WRITES`, in order) and events in their own buffer, and a background task
retries them with backoff; callers get their results meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple, cast

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import RedisError, SlotNotCoveredError
from redis.typing import EncodableT, FieldT

from agentpool.background import Background
from agentpool.cluster.acl import display_url
from agentpool.cluster.clients import async_pool, cluster_away_as_connection_error, is_cluster
from agentpool.cluster.keys import Keys
from agentpool.models import AgentResult, AgentTask

log = logging.getLogger("agentpool.store")

#: Events waiting for Redis, at most, per process.
MAX_PENDING_EVENTS = 100_000
#: Final records (and admissions) waiting for Redis, at most, per process.
MAX_PENDING_WRITES = 20_000
#: Retry delays of the outbox while Redis is away: first, growth, longest.
_RETRY_FIRST_S, _RETRY_GROWTH, _RETRY_MAX_S = 0.05, 2.0, 2.0
REDIS_DOWN = (RedisError, OSError)
#: Events sent in one pipeline, at most.
_EVENT_BATCH = 500
#: How long events and writes no caller waits on (a call's spend) wait for company before
#: they are sent: a task's final write, due soon after its last call, carries them in its
#: own round trip (one instead of two after each one-call task), and under load they go
#: in fewer, fuller pipelines. A write a caller awaits goes at once, with all that waits.
LINGER_S = 0.002


#: An event posted to its tenant's stream and its task's (`Posting.task_stream`): one
#: command instead of two XADDs and an EXPIRE. In a worker's pipeline of a loop turn's
#: writes, redis-py's client spends about 16 µs per command, so this halves an event's cost
#: (47-50 against 23-27 µs, measured over pipelines of 100 events). The two keys share the
#: tenant's hash tag: one slot on a Redis Cluster. ARGV: the first stream's MAXLEN ('' for
#: none), the task stream's MAXLEN, its TTL, then the entry's fields and values.
POST_TWICE = """
local function add(key, maxlen)
  if maxlen == '' then return redis.call('XADD', key, '*', unpack(ARGV, 4)) end
  return redis.call('XADD', key, 'MAXLEN', '~', maxlen, '*', unpack(ARGV, 4))
end
local id = add(KEYS[1], ARGV[1])
add(KEYS[2], ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[3])
return id
"""


class Posting(NamedTuple):
    """An entry queued for its stream (trimmed to about `maxlen`; None: not trimmed) and,
    with `task_stream`, for its task's stream too (trimmed to `task_maxlen`, its TTL reset
    to `ttl_s`)."""

    stream: str
    entry: dict[str, str]
    maxlen: int | None
    task_stream: str | None = None
    task_maxlen: int = 0
    ttl_s: int = 0

    def add_to(self, pipe: Any) -> None:
        if self.task_stream is None:
            pipe.xadd(self.stream, cast("dict[FieldT, EncodableT]", self.entry), maxlen=self.maxlen, approximate=True)
            return
        fields = [part for pair in self.entry.items() for part in pair]
        maxlen = "" if self.maxlen is None else self.maxlen
        pipe.eval(POST_TWICE, 2, self.stream, self.task_stream, maxlen, self.task_maxlen, self.ttl_s, *fields)


#: `StoreBase._pipelined`, as the store's parts that share its batches take it.
Pipelined = Callable[[Callable[[Any], int]], Awaitable[list[Any]]]


def raised(value: Any) -> Any:
    """A pipelined command's result (`StoreBase._pipelined`), or the error it failed with, raised."""
    if isinstance(value, Exception):
        raise value
    return value


@dataclass(frozen=True)
class Scripted:
    """A Lua script's call, to run in a pipeline with other writes (`ResultStore.write_result`'s
    `also`): sent as EVAL, so a pipeline of them costs one round trip whether or not Redis has
    the script cached."""

    source: str
    keys: tuple[str, ...]
    args: tuple[str | int | float, ...]

    def add_to(self, pipe: Any) -> None:
        pipe.eval(self.source, len(self.keys), *self.keys, *self.args)


class _KeysNoted:
    """A pipeline that notes the keys of the commands put on it (the first argument, or an
    EVAL's keys): a cluster's WAIT goes to the nodes they live on."""

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe
        self.keys: list[Any] = []

    def __getattr__(self, name: str) -> Any:
        command = getattr(self.pipe, name)

        def noted(*args: Any, **kwargs: Any) -> Any:
            if name == "eval":
                self.keys += args[2 : 2 + int(args[1])]
            elif args:
                self.keys.append(args[0])
            return command(*args, **kwargs)

        return noted


@dataclass(frozen=True)
class PendingAdmission:
    """An admission not yet recorded: the task and its `protocol.Admitted` JSON."""

    task: AgentTask
    entry: str


class StoreBase(ABC):
    """Async access to one pool's keys: the connection, the scripts and the outbox."""

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
        task_events_ttl_s: int = 0,
        task_events_maxlen: int = 2000,
        pii: Callable[[str], list[str]] | None = None,
        session_ttl: Callable[[str], int] | None = None,
        wait_replicas: int = 0,
        wait_timeout_ms: int = 1000,
        linger_events: bool = False,
    ) -> None:
        self.keys = keys
        #: Whether events linger (`LINGER_S`). A task's stream takes events from two processes:
        #: only the worker, whose final write follows its events through this same queue, may
        #: hold them back; the scheduler's `task_admitted` must not land after the worker's.
        self._linger_events = linger_events
        #: Replicas each admission and record must reach before it counts (Redis WAIT).
        self._wait_replicas, self._wait_timeout_ms = wait_replicas, wait_timeout_ms
        #: Writes whose replicas did not all confirm within the timeout.
        self.unreplicated = 0
        self._wait_warned = float("-inf")
        #: How long a tenant's sessions live after their last turn (its session policy).
        self._session_ttl = session_ttl or (lambda tenant: 7 * 86_400)
        #: What the next write of a session task's record stores of its session, by task_id.
        self._session_writes: dict[str, Any] = {}
        #: The kinds of personal data to redact from a tenant's records (its guardrails).
        self._pii = pii or (lambda tenant: [])
        self.pool = pool
        self._url = url
        self._ttl = result_ttl_s or 0
        self._maxlen = stream_maxlen
        self._event_log = event_log
        self._audit_maxlen = audit_maxlen
        self._task_events_ttl = task_events_ttl_s
        self._task_events_maxlen = task_events_maxlen
        self._redis: aioredis.Redis | None = None
        self._scripts: dict[str, Any] = {}
        #: Events (each for its tenant's stream and its task's) and audit entries, in order.
        self._events: list[Posting] = []
        self._lookups: list[tuple[PendingAdmission, asyncio.Future[Any]]] = []
        self._background = Background()
        self._kick: asyncio.Task[None] | None = None
        #: The timer that sends what lingers (`LINGER_S`), while one is set.
        self._linger: asyncio.TimerHandle | None = None
        #: Writes waiting to go with the next batch of events (`_pipelined`).
        self._ops: list[tuple[Callable[[Any], int], asyncio.Future[list[Any]]]] = []
        self._flush_lock = asyncio.Lock()
        self._outbox: deque[AgentResult | PendingAdmission] = deque()
        self._drainer: asyncio.Task[None] | None = None
        self.events_dropped = 0
        self.writes_dropped = 0
        self.writes_retried = 0
        #: When the current outage began (wall clock), and what Redis answered then.
        self.unreachable_since: float | None = None
        self.last_error: str | None = None

    @property
    def redis(self) -> aioredis.Redis:
        # Created lazily, on first use, so that the client binds to the actor's event loop.
        # A blocking pool: under a burst (thousands of tasks admitted at once) callers wait for
        # a free connection instead of failing with "Too many connections". A dropped
        # connection is retried briefly; a longer outage is the outbox's to ride out.
        if self._redis is None:
            self._redis = async_pool(
                self._url,
                max_connections=64,
                timeout_s=60,
                decode_responses=True,
                socket_connect_timeout=2,
                socket_timeout=30,
                retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), 2),
            )
            self._scripts = {}
        return self._redis

    def _add_wait(self, pipe: Any, keys: Iterable[Any] = ()) -> int:
        """Ends a pipeline of writes that must reach the replicas with WAIT, when configured;
        how many WAITs it added (their replies are then the pipeline's last). One server
        takes one; on a Redis Cluster, each primary that `keys` (the keys written) live on
        takes one, on the connection the pipeline wrote to it with (WAIT counts its own
        connection's writes), so a shard short of replicas delays only its own writes."""
        if not self._wait_replicas:
            return 0
        if not is_cluster(self.redis):
            pipe.execute_command("WAIT", self._wait_replicas, self._wait_timeout_ms)
            return 1
        cluster = cast(RedisCluster, self.redis)  # `redis` is typed as a one-server client
        nodes = {}
        with cluster_away_as_connection_error():  # a shard without its primary for now
            for key in keys:
                node = cluster.get_node_from_key(key)
                if node is None:
                    raise SlotNotCoveredError(f"no node serves {key!r}")
                nodes[node.name] = node
        for node in nodes.values():
            pipe.execute_command("WAIT", self._wait_replicas, self._wait_timeout_ms, target_nodes=node)
        return len(nodes)

    def _check_wait(self, replies: list[Any]) -> None:
        """Counts (and logs, at most once a minute) writes fewer replicas confirmed than asked."""
        for reply in replies:
            self._check_one_wait(reply)

    def _check_one_wait(self, reply: Any) -> None:
        if isinstance(reply, int) and reply >= self._wait_replicas:
            return
        self.unreplicated += 1
        now = time.monotonic()
        if now - self._wait_warned > 60:
            self._wait_warned = now
            log.warning(
                "Redis WAIT: %s of %d replicas confirmed a write within %d ms (%d such writes so far)",
                reply,
                self._wait_replicas,
                self._wait_timeout_ms,
                self.unreplicated,
            )

    def _script(self, name: str, source: str) -> Any:
        """The Lua script `source`, registered once on this process's client."""
        client = self.redis
        if name not in self._scripts:
            self._scripts[name] = client.register_script(source)
        return self._scripts[name]

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

    def _buffer(self, item: AgentResult | PendingAdmission) -> None:
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
                        await self._admit_again(item)
                    self._outbox.popleft()
                    self.writes_retried += 1
                await self.flush()
                if self._events:
                    raise ConnectionError("events still pending")
                delay = _RETRY_FIRST_S
            except REDIS_DOWN as exc:
                self._down(exc)
                await asyncio.sleep(delay)
                delay = min(delay * _RETRY_GROWTH, _RETRY_MAX_S)
        self._up()

    async def _pipelined(self, add: Callable[[Any], int], *, linger: bool = False) -> list[Any]:
        """Sends the commands `add` puts on a pipeline (it returns how many) with the next
        batch of this process's writes, after the events queued before it; returns their
        results, each an exception if its command failed. Ops and events queued in one turn
        of the event loop share one round trip, so under load a task's writes cost a share
        of one, and alone they cost one. With `linger` (a write whose caller does not wait on
        it), the batch may wait `LINGER_S` for more.

        Raises:
            RedisError, OSError: If Redis could not be reached.
        """
        future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        self._ops.append((add, future))
        self._kick_flush(linger=linger)
        return await future

    def _kick_flush(self, *, linger: bool = False) -> None:
        """Has what is queued sent: in the next turn of the loop, or with `linger`, within
        `LINGER_S` (sooner if a write that may not linger comes meanwhile)."""
        if self._kick is not None:  # a flush is due: it takes everything queued by then
            return
        if not linger:
            self._send_now()
        elif self._linger is None:
            self._linger = asyncio.get_running_loop().call_later(LINGER_S, self._send_now)

    def _send_now(self) -> None:
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        if self._kick is None:
            self._kick = asyncio.get_running_loop().create_task(self.flush())

    async def _send_queued(self) -> None:
        """Sends the queued events and ops in order, in pipelines of at most `_EVENT_BATCH`
        events (ops go with the last). Events stay queued (for the outbox) if Redis fails;
        the ops in flight hear of the failure."""
        async with self._flush_lock:  # one batch at a time keeps the events in order
            self._kick = None
            while self._events or self._ops:
                batch = self._events[:_EVENT_BATCH]
                ops: list[tuple[Callable[[Any], int], asyncio.Future[list[Any]]]] = []
                if len(self._events) <= _EVENT_BATCH:
                    ops, self._ops = self._ops, []
                try:
                    pipe = self.redis.pipeline(transaction=False)
                    for posting in batch:
                        posting.add_to(pipe)
                    sent = len(batch)
                    # Only a cluster's WAIT needs the keys written (`_add_wait`): one server's
                    # ops go on the pipeline itself, with nothing between.
                    noted = _KeysNoted(pipe) if self._wait_replicas and is_cluster(self.redis) else None
                    counts = [add(noted or pipe) for add, _ in ops]
                    waits = self._add_wait(pipe, noted.keys if noted else ()) if ops else 0
                    results = await pipe.execute(raise_on_error=False)
                    if waits:
                        self._check_wait(results[-waits:])
                except BaseException as exc:
                    for _, future in ops:
                        if future.done():
                            continue
                        if isinstance(exc, Exception):
                            future.set_exception(exc)
                        else:  # this flush was cancelled (the process stops): so are its ops
                            future.cancel()
                    raise
                del self._events[: len(batch)]
                failed = [r for r in results[:sent] if isinstance(r, Exception)]
                if failed:  # refused, not lost in transit: sending them again would not help
                    self.events_dropped += len(failed)
                    log.error("Redis refused %d events: %s", len(failed), failed[0])
                at = sent
                for (_, future), count in zip(ops, counts, strict=True):
                    if not future.done():
                        future.set_result(list(results[at : at + count]))
                    at += count

    @property
    def backlog(self) -> dict[str, int]:
        """Writes waiting for Redis and what was dropped for want of room."""
        return {
            "pending_writes": len(self._outbox),
            "pending_events": len(self._events),
            "writes_dropped": self.writes_dropped,
            "events_dropped": self.events_dropped,
            "unreplicated": self.unreplicated,
        }

    async def reachable(self, timeout_s: float = 1.0) -> tuple[bool, str | None]:
        """Whether Redis answers a PING now, and if not, why (for `status()`)."""
        try:
            await asyncio.wait_for(self.redis.ping(), timeout_s)
        except (TimeoutError, *REDIS_DOWN) as exc:
            return False, f"{type(exc).__name__}: {exc}"[:300]
        return True, None

    # --- what the outbox retries, provided by the parts ------------------------------------

    @abstractmethod
    async def _write(self, result: AgentResult) -> tuple[AgentResult, bool]:
        """Writes a final record (`cluster.records.FinalRecords`)."""

    @abstractmethod
    async def _admit_again(self, pending: PendingAdmission) -> None:
        """Records an admission that waited (`cluster.journal.Journal`)."""

    @abstractmethod
    async def flush(self) -> None:
        """Sends the queued events (`cluster.event_log.EventLog`)."""

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        return self._background.spawn(coro)

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None
