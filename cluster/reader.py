"""`ResultsReader`: the blocking side of the result store, for a user's process: one
tenant's results, its events per task, its audit trail."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import redis

from agentpool.models import AgentResult
from cluster.keys import Keys


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

    def task_events(self, task_id: str, *, scan_limit: int = 200_000) -> list[dict[str, Any]]:
        """The task's structured events, oldest first (`data` decoded). Reads the tenant's
        events stream backwards from its newest entry until the task's first admission, or
        `scan_limit` entries: a recent task costs a few round trips, whatever the stream holds."""
        stream = self.keys.events(self.tenant)
        found: list[dict[str, Any]] = []
        cursor, scanned = "+", 0
        while scanned < scan_limit:
            entries = self._redis.xrevrange(stream, max=cursor, count=1000)
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
                if fields.get("event") == "task_admitted" and not data.get("adopted"):
                    return found[::-1]
            cursor = entries[-1][0]
        return found[::-1]

    def audit(self, *, count: int = 1000) -> list[dict[str, str]]:
        """The newest `count` entries of the tenant's audit trail, oldest first."""
        entries = self._redis.xrevrange(self.keys.audit(self.tenant), count=count)
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


def find_tenant(url: str, task_id: str, *, keys: Keys | None = None) -> str | None:
    """The tenant of a task this Redis knows (a final record, or an admission still in
    progress), found by SCAN; None if none."""
    keys = keys or Keys()
    client = redis.Redis.from_url(url, decode_responses=True)
    try:
        for key in client.scan_iter(match=keys.result("*", task_id), count=1000):
            return _tenant_of(key)
        for key in client.scan_iter(match=keys.admitted("*", "*"), count=1000):
            if client.hexists(key, task_id):
                return _tenant_of(key)
    finally:
        client.close()
    return None


def _tenant_of(key: str) -> str:
    """The tenant inside a key's hash tag: `prefix:{tenant}:...`."""
    return key[key.index("{") + 1 : key.index("}")]
