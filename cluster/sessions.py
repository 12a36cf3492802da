"""Sessions in Redis: a session's history, read at a task's start and written with its final
record (`cluster.records`), its export, and its deletion with everything of its tasks.

A session is a hash (`Keys.session`): the history as one JSON list, a `version` that grows by
one per stored turn (a write names the version it started from, so two runs can never
interleave their turns), and counters. Its tasks are indexed (`Keys.session_tasks`) when
their records are written, and the tenant's sessions by last use (`Keys.sessions`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, cast

import redis.asyncio as aioredis
from pydantic import BaseModel, Field

from agentpool.cluster.keys import Keys, stream_entries

#: Stream entries read per XRANGE while a deletion looks for a session's entries.
_SCAN_CHUNK = 1000


class SessionRecord(BaseModel):
    """A session as stored: its history and what is known of it."""

    tenant: str
    session_id: str
    messages: list[dict[str, Any]] = Field(default_factory=list)
    #: One more per turn stored (0: nothing stored yet).
    version: int = 0
    turns: int = 0
    compactions: int = 0
    updated_unix: float | None = None
    last_task: str | None = None
    #: The session's tasks, oldest first (export only).
    tasks: list[str] = Field(default_factory=list)


@dataclass(frozen=True)
class SessionWrite:
    """What a task's final write stores of its session: the new history (None: the history
    stays as it is, the task is only indexed), the version it started from, the TTL."""

    session_id: str
    messages: str | None
    expected_version: int
    ttl_s: int
    compactions: int = 0


@dataclass
class Erased:
    """What a deletion removed."""

    tenant: str
    session_id: str
    tasks: list[str] = field(default_factory=list)
    keys: int = 0
    stream_entries: int = 0
    messages: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "tenant": self.tenant,
            "session_id": self.session_id,
            "tasks": len(self.tasks),
            "keys_deleted": self.keys,
            "stream_entries_deleted": self.stream_entries,
            "messages_deleted": self.messages,
        }


def parse_session(tenant: str, session_id: str, raw: dict[str, str]) -> SessionRecord | None:
    """A session from its hash (HGETALL's reply); None when there is none."""
    if not raw:
        return None
    return SessionRecord(
        tenant=tenant,
        session_id=session_id,
        messages=json.loads(raw.get("messages") or "[]"),
        version=int(raw.get("version") or 0),
        turns=int(raw.get("turns") or 0),
        compactions=int(raw.get("compactions") or 0),
        updated_unix=float(raw["updated"]) if raw.get("updated") else None,
        last_task=raw.get("last_task") or None,
    )


class SessionStore:
    """Reads, exports and deletes sessions (one pool's keys)."""

    def __init__(self, redis: Callable[[], aioredis.Redis], keys: Keys, *, pool: str) -> None:
        self._redis = redis
        self.keys = keys
        self.pool = pool

    async def load(self, tenant: str, session_id: str) -> SessionRecord | None:
        raw = await self._redis().hgetall(self.keys.session(tenant, session_id))
        return parse_session(tenant, session_id, cast(dict[str, str], raw))

    async def export(self, tenant: str, session_id: str) -> SessionRecord | None:
        """The session's history and its tasks; None if it has neither."""
        pipe = self._redis().pipeline(transaction=False)
        pipe.hgetall(self.keys.session(tenant, session_id))
        pipe.zrange(self.keys.session_tasks(tenant, session_id), 0, -1)
        raw, tasks = cast(tuple[dict[str, str], list[str]], await pipe.execute())
        record = parse_session(tenant, session_id, raw)
        if record is None and not tasks:
            return None
        record = record or SessionRecord(tenant=tenant, session_id=session_id)
        record.tasks = list(tasks)
        return record

    async def recent(self, tenant: str, limit: int = 100) -> list[dict[str, Any]]:
        """The tenant's sessions, the most recently used first: id and last use."""
        rows = await self._redis().zrevrange(self.keys.sessions(tenant), 0, max(0, limit - 1), withscores=True)
        return [{"session_id": sid, "updated_unix": score} for sid, score in cast(list[tuple[str, float]], rows)]

    async def session_ids(self, tenant: str) -> list[str]:
        return cast(list[str], await self._redis().zrange(self.keys.sessions(tenant), 0, -1))

    async def erase(self, tenant: str, session_id: str) -> Erased:
        """Deletes the session and everything of its tasks: their records, checkpoints,
        leases, events (their own streams, and their entries in the tenant's streams),
        tool-call records, webhook delivery logs and backlog entries. The caller has ended
        its tasks first (a task still running would write its turn back)."""
        r = self._redis()
        k = self.keys
        erased = Erased(tenant, session_id)
        raw = cast(dict[str, str], await r.hgetall(k.session(tenant, session_id)))
        if raw.get("messages"):
            erased.messages = len(json.loads(raw["messages"]))
        erased.tasks = cast(list[str], await r.zrange(k.session_tasks(tenant, session_id), 0, -1))
        # Tasks accepted and not yet ended (in the Redis backlog) are not indexed yet.
        marker = f'"session_id":{json.dumps(session_id)}'
        async for task_id, admission in r.hscan_iter(k.admitted(tenant, self.pool)):
            if marker in admission and task_id not in erased.tasks:
                erased.tasks.append(task_id)
        ids = set(erased.tasks)
        doomed = [k.session(tenant, session_id), k.session_tasks(tenant, session_id)]
        for task_id in erased.tasks:
            doomed += [k.result(tenant, task_id), k.task_events(tenant, task_id), k.webhook_log(tenant, task_id)]
            doomed += k.task_keys(tenant, task_id)
            async for key in r.scan_iter(match=_glob(k.tool_call(tenant, task_id, "")) + "*", count=1000):
                doomed.append(key)
        for start in range(0, len(doomed), 500):
            erased.keys += int(await r.delete(*doomed[start : start + 500]))
        pipe = r.pipeline(transaction=False)
        pipe.zrem(k.sessions(tenant), session_id)
        if ids:
            pipe.hdel(k.admitted(tenant, self.pool), *ids)
            for backlog in k.backlogs(tenant, self.pool):
                pipe.zrem(backlog, *ids)
        await pipe.execute()
        streams = (k.results(tenant), k.events(tenant), k.audit(tenant), k.approvals(tenant), k.webhook_dead(tenant))
        for stream in streams:
            erased.stream_entries += await self._erase_entries(stream, ids)
        erased.keys += await self._erase_mentions(tenant, ids)
        return erased

    async def _erase_mentions(self, tenant: str, task_ids: set[str]) -> int:
        """Deletes what names the tasks among the tenant's keys that are not theirs alone:
        stored HTTP responses (`Idempotency-Key`), webhook deliveries still to be made, and
        their places in HTTP batches. Returns how many keys, fields and items went."""
        if not task_ids:
            return 0
        r, k = self._redis(), self.keys
        quoted = [json.dumps(t) for t in task_ids]

        def mentions(text: str | None) -> bool:
            return text is not None and any(q in text for q in quoted)

        removed = 0
        async for key in r.scan_iter(match=_glob(k.idempotency(tenant, "")) + "*", count=1000):
            if mentions(cast(str | None, await r.get(key))):
                removed += int(await r.delete(key))
        jobs = cast(dict[str, str], await r.hgetall(k.webhook_jobs(tenant)))
        doomed = [job_id for job_id, job in jobs.items() if mentions(job)]
        if doomed:
            removed += int(await r.hdel(k.webhook_jobs(tenant), *doomed))
            await r.zrem(k.webhook_due(tenant), *doomed)
        async for key in r.scan_iter(match=_glob(k.batch(tenant, "")) + "*", count=1000):
            members = cast(list[str], await r.lrange(key, 0, -1))
            for task_id in set(members) & task_ids:
                removed += int(await r.lrem(key, 0, task_id))
        return removed

    async def _erase_entries(self, stream: str, task_ids: Iterable[str]) -> int:
        """Deletes the stream's entries whose `task_id` is one of `task_ids`."""
        wanted = set(task_ids)
        if not wanted:
            return 0
        r = self._redis()
        removed, after = 0, "-"
        while True:
            entries = stream_entries(await r.xrange(stream, min=after, max="+", count=_SCAN_CHUNK))
            if not entries:
                return removed
            doomed = [entry_id for entry_id, fields in entries if fields.get("task_id") in wanted]
            if doomed:
                removed += int(await r.xdel(stream, *doomed))
            after = "(" + entries[-1][0]
            if len(entries) < _SCAN_CHUNK:
                return removed


def _glob(text: str) -> str:
    """`text` with the characters SCAN patterns treat specially escaped."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)
