"""`ResultsReader`: the blocking side of the result store, for a user's process: one
tenant's results, its events per task, its audit trail."""

from __future__ import annotations

import contextlib
import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import redis
from redis.exceptions import AuthenticationError, NoPermissionError, RedisError

from agentpool.cluster.acl import display_url
from agentpool.cluster.clients import sync_client
from agentpool.cluster.keys import Keys, stream_entries
from agentpool.errors import StoreError, StoreUnavailable
from agentpool.events import EventEntry
from agentpool.models import AgentResult
from agentpool.vocabulary import EventType

#: A blocking read waits at most this long; the socket's timeout is longer, so an idle
#: `follow()` is a read that returned empty, never a timeout.
MAX_BLOCK_MS = 20_000
_SOCKET_TIMEOUT_S = MAX_BLOCK_MS / 1000 + 10
#: `follow()` rides out a Redis restart or a dropped connection this long before it raises.
_FOLLOW_RECONNECT_S = 30.0


def client(url: str) -> redis.Redis:
    """A blocking client for a user's process: connects within 5 s, and waits on a read
    longer than any blocking read the readers make."""
    return sync_client(url, decode_responses=True, socket_connect_timeout=5, socket_timeout=_SOCKET_TIMEOUT_S)


@contextlib.contextmanager
def store_errors(url: str) -> Iterator[None]:
    """redis-py's errors as agentpool's: `StoreUnavailable` when Redis cannot be reached,
    `StoreError` when it refuses (credentials, ACL) or answers what we did not expect. The
    message names the server with its password masked."""
    where = display_url(url)
    try:
        yield
    except AuthenticationError as exc:
        raise StoreError(f"Redis at {where} refused the credentials: {exc}", url=where) from None
    except NoPermissionError as exc:
        raise StoreError(f"Redis at {where} refused access: {exc}", url=where) from None
    except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
        raise StoreUnavailable(f"cannot reach Redis at {where}: {exc}", url=where) from None
    except RedisError as exc:
        raise StoreError(f"Redis at {where}: {type(exc).__name__}: {exc}", url=where) from None


def ping(url: str, *, timeout_s: float = 3.0) -> None:
    """Checks that Redis at `url` answers (PING, with the URL's credentials).

    Raises:
        StoreUnavailable: If it cannot be reached within `timeout_s`.
        StoreError: If the URL is not one redis-py can use, or the server refuses it.
    """
    try:
        probe = sync_client(url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s)
    except ValueError as exc:
        raise StoreError(f"not a Redis URL ({exc})", url=display_url(url)) from None
    try:
        with store_errors(url):
            probe.ping()
    finally:
        probe.close()


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
        self._url = url
        self._redis = client(url)
        self.stream = self.keys.results(tenant)

    def read(self, *, start: str = "-", count: int | None = None) -> Iterator[AgentResult]:
        """Yields results already in the stream, oldest first, from stream id `start`.

        Raises:
            StoreUnavailable: If Redis cannot be reached.
            StoreError: If Redis refuses the credentials or the keys (ACL).
        """
        page = 1000 if count is None else min(count, 1000)
        seen = 0
        cursor = start
        while count is None or seen < count:
            with store_errors(self._url):
                entries = stream_entries(self._redis.xrange(self.stream, min=cursor, count=page))
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
        """The task's final record, or None if it has none (yet)."""
        with store_errors(self._url):
            raw = self._redis.get(self.keys.result(self.tenant, task_id))
        return AgentResult.model_validate_json(raw) if raw else None

    def task_events(self, task_id: str, *, scan_limit: int = 200_000) -> list[dict[str, Any]]:
        """The task's structured events, oldest first (`data` decoded). Reads the tenant's
        events stream backwards from its newest entry until the task's first admission, or
        `scan_limit` entries: a recent task costs a few round trips, whatever the stream holds."""
        stream = self.keys.events(self.tenant)
        found: list[dict[str, Any]] = []
        cursor, scanned = "+", 0
        while scanned < scan_limit:
            with store_errors(self._url):
                entries = stream_entries(self._redis.xrevrange(stream, max=cursor, count=1000))
            if cursor != "+":
                entries = entries[1:]  # max is inclusive: skip the one we already read
            if not entries:
                break
            scanned += len(entries)
            for entry_id, fields in entries:
                if fields.get("task_id") != task_id:
                    continue
                data = json.loads(fields.get("data") or "{}")
                found.append({**fields, "id": entry_id, "ts": float(fields.get("ts", 0)), "data": data})
                if fields.get("event") == EventType.TASK_ADMITTED and not data.get("adopted"):
                    return found[::-1]
            cursor = entries[-1][0]
        return found[::-1]

    def events(
        self, task_id: str, *, after: str = "0-0", follow: bool = False, block_ms: int = 5000
    ) -> Iterator[EventEntry]:
        """The task's events from its own stream (`PoolConfig.task_events_ttl_s`), oldest
        first, after stream id `after` (an entry's `id`: a reader resumes where it stopped).

        With `follow`, waits for more as they are written and ends once the task's final
        record exists and every event written with it has been given (the record and its
        last events are written in one atomic step); without, ends at the stream's end.

        Raises:
            StoreUnavailable: If Redis cannot be reached.
            StoreError: If Redis refuses the credentials or the keys (ACL).
        """
        key = self.keys.task_events(self.tenant, task_id)
        block_ms = max(1, min(block_ms, MAX_BLOCK_MS))
        cursor, ending, block = after, False, None
        while True:
            with store_errors(self._url):
                reply: Any = self._redis.xread({key: cursor}, count=500, block=block)
            entries = stream_entries(reply[0][1] if reply else None)
            for entry_id, fields in entries:
                yield EventEntry.from_stream(entry_id, fields)
                cursor = entry_id
            if entries or block is not None:
                block = None  # at the stream's end, the record is checked before waiting
                continue
            if not follow or ending:
                return
            with store_errors(self._url):
                ending = bool(self._redis.exists(self.keys.result(self.tenant, task_id)))
            block = None if ending else block_ms

    def audit(self, *, count: int = 1000) -> list[dict[str, str]]:
        """The newest `count` entries of the tenant's audit trail, oldest first."""
        with store_errors(self._url):
            entries = stream_entries(self._redis.xrevrange(self.keys.audit(self.tenant), count=count))
        return [{"id": entry_id, **fields} for entry_id, fields in reversed(entries)]

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

        Idle is normal: a read that waited `block_ms` for nothing is followed by the next. A
        dropped connection (Redis restarting) is retried for up to 30 s.

        Args:
            group: Consumer group; consumers in one group share the work.
            consumer: This consumer's name; defaults to host and process id.
            block_ms: How long each read blocks waiting for new entries (at most 20 s).
            idle_timeout_s: Stop after this long without a new entry (None: follow forever).

        Raises:
            StoreUnavailable: If Redis stays unreachable for 30 s.
            StoreError: If Redis refuses the credentials or the keys (ACL).
        """
        consumer = consumer or f"{socket.gethostname()}-{id(self)}"
        block_ms = max(0, min(block_ms, MAX_BLOCK_MS))
        with store_errors(self._url):
            try:
                self._redis.xgroup_create(self.stream, group, id="0", mkstream=True)
            except redis.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
        last_new = time.monotonic()
        cursor = "0"  # first our own pending (unacknowledged) entries, then new ones
        while True:
            reply = self._read_group(group, consumer, cursor, block_ms)
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
                with store_errors(self._url):
                    self._redis.xack(self.stream, group, entry_id)

    def _read_group(self, group: str, consumer: str, cursor: str, block_ms: int) -> Any:
        """One XREADGROUP, retried with backoff while the connection is down (not forever)."""
        gave_up = time.monotonic() + _FOLLOW_RECONNECT_S
        delay = 0.1
        while True:
            try:
                with store_errors(self._url):
                    return self._redis.xreadgroup(group, consumer, {self.stream: cursor}, count=100, block=block_ms)
            except StoreUnavailable:
                if time.monotonic() + delay > gave_up:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 2.0)

    def close(self) -> None:
        self._redis.close()


def find_tenant(url: str, task_id: str, *, keys: Keys | None = None) -> str | None:
    """The tenant of a task this Redis knows (a final record, or an admission still in
    progress), found by SCAN; None if none."""
    keys = keys or Keys()
    admin = client(url)
    try:
        with store_errors(url):
            for key in admin.scan_iter(match=keys.result("*", task_id), count=1000):
                return _tenant_of(key)
            for key in admin.scan_iter(match=keys.admitted("*", "*"), count=1000):
                if admin.hexists(key, task_id):
                    return _tenant_of(key)
    finally:
        admin.close()
    return None


def _tenant_of(key: str) -> str:
    """The tenant inside a key's hash tag: `prefix:{tenant}:...`."""
    return key[key.index("{") + 1 : key.index("}")]
