"""Waiting for the final records of a set of tasks, as they are written: `Completions` for a
user's process (what `AgentPool.map` yields), and its bookkeeping, `CompletionBook`, which
the relay actor (`actors.relay`) shares.

Records are read from the results streams of the tenants the tasks belong to, from where
each stream stood before the first of them was submitted; only the tasks still awaited are
kept. What the streams cannot give (a record written before the task was watched, an entry
trimmed by `stream_maxlen` before it was read) is looked up by id when they go quiet, so no
record is missed.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from agentpool.cluster.keys import Keys, stream_entries
from agentpool.cluster.reader import client, store_errors
from agentpool.cluster.slots import xread
from agentpool.models import AgentResult, AgentTask

#: Records read from the streams per call, and ids looked up per round trip.
PAGE = 1000


@dataclass(frozen=True)
class Lookup:
    """Awaited tasks of one tenant and their record keys, for one MGET."""

    task_ids: list[str]
    keys: list[str]


class CompletionBook:
    """Which tasks are awaited (how many times each), and where each results stream was read
    up to. No I/O: the caller reads Redis and hands the replies in."""

    def __init__(self, keys: Keys) -> None:
        self.keys = keys
        #: Stream -> the id read up to.
        self.cursors: dict[str, str] = {}
        #: task_id -> (tenant, how many times it is awaited).
        self._awaited: dict[str, tuple[str, int]] = {}
        self._tenants: Counter[str] = Counter()

    def __len__(self) -> int:
        return sum(n for _, n in self._awaited.values())

    def __contains__(self, task_id: object) -> bool:
        return task_id in self._awaited

    def unread_streams(self, tasks: Iterable[AgentTask]) -> list[str]:
        """The streams of these tasks' tenants with no cursor yet (read their last id first)."""
        return list(dict.fromkeys(s for t in tasks if (s := self.keys.results(t.tenant)) not in self.cursors))

    def start_at(self, stream: str, last: object) -> None:
        """Sets a stream's cursor from its XREVRANGE COUNT 1 reply."""
        entries = stream_entries(last)
        self.cursors.setdefault(stream, entries[0][0] if entries else "0-0")

    def watch(self, task_id: str, tenant: str) -> None:
        tenant, times = self._awaited.get(task_id, (tenant, 0))
        self._awaited[task_id] = (tenant, times + 1)
        self._tenants[tenant] += 1

    def streams(self) -> dict[Any, Any]:
        """What to XREAD: the streams of tenants with awaited tasks, from their cursors."""
        return {(s := self.keys.results(t)): self.cursors[s] for t in self._tenants}

    def read(self, replies: Any) -> list[AgentResult]:
        """The awaited records among an XREAD reply (each as many times as it is awaited)."""
        out: list[AgentResult] = []
        for stream, entries in replies or []:
            for entry_id, fields in entries:
                self.cursors[stream] = entry_id
                if fields.get("task_id") in self._awaited:
                    out += self._done(AgentResult.model_validate_json(fields["result"]))
        return out

    def lookups(self, task_ids: Sequence[str]) -> list[Lookup]:
        """Those of `task_ids` still awaited, with their record keys, grouped by tenant: one
        MGET each (a tenant's keys share a Redis Cluster slot). A GET per id cost redis-py
        five times the CPU of its place in an MGET."""
        groups: dict[str, Lookup] = {}
        for task_id in task_ids:
            if task_id in self._awaited:
                tenant = self._awaited[task_id][0]
                group = groups.setdefault(tenant, Lookup([], []))
                group.task_ids.append(task_id)
                group.keys.append(self.keys.result(tenant, task_id))
        return list(groups.values())

    def awaited(self) -> list[str]:
        return list(self._awaited)

    def found(self, lookups: Sequence[Lookup], replies: Sequence[Sequence[str | bytes | None]]) -> list[AgentResult]:
        """The records the MGETs of `lookups` returned (None: not written yet)."""
        out: list[AgentResult] = []
        for lookup, raws in zip(lookups, replies, strict=True):
            for task_id, raw in zip(lookup.task_ids, raws, strict=True):
                if raw and task_id in self._awaited:
                    out += self._done(AgentResult.model_validate_json(raw))
        return out

    def forget(self, task_id: str) -> None:
        """Stops awaiting a task (its caller was answered otherwise)."""
        if task_id in self._awaited:
            self._pop(task_id)

    def _done(self, result: AgentResult) -> list[AgentResult]:
        return [result] * self._pop(result.task_id)

    def _pop(self, task_id: str) -> int:
        """Stops awaiting a task; returns how many times it was awaited."""
        tenant, times = self._awaited.pop(task_id)
        self._tenants[tenant] -= times
        if self._tenants[tenant] <= 0:
            del self._tenants[tenant]
        return times


class Completions:
    """The records of watched tasks, read with a blocking client (a user's process)."""

    def __init__(self, url: str, *, keys: Keys) -> None:
        self._url = url
        self._redis = client(url)
        self._book = CompletionBook(keys)

    def __len__(self) -> int:
        return len(self._book)

    def watch(self, tasks: Sequence[AgentTask]) -> None:
        """Starts waiting for these tasks' records (call it before they are submitted)."""
        with store_errors(self._url):
            for stream in self._book.unread_streams(tasks):
                self._book.start_at(stream, self._redis.xrevrange(stream, count=1))
        for task in tasks:
            self._book.watch(task.task_id, task.tenant)

    def take(self, block_ms: int) -> list[AgentResult]:
        """Records of watched tasks written since the last call, waiting up to `block_ms`
        for the first; when none comes, looks the rest up by id."""
        streams = self._book.streams()
        if not streams:
            return []
        with store_errors(self._url):
            out = self._book.read(xread(self._redis, streams, count=PAGE, block_ms=block_ms))
        return out or self.fetch(self._book.awaited())

    def fetch(self, task_ids: Sequence[str]) -> list[AgentResult]:
        """The records these watched tasks have already, by id."""
        out: list[AgentResult] = []
        for start in range(0, len(task_ids), PAGE):
            lookups = self._book.lookups(task_ids[start : start + PAGE])
            if not lookups:
                continue
            with store_errors(self._url):
                pipe = self._redis.pipeline(transaction=False)
                for lookup in lookups:
                    pipe.mget(lookup.keys)
                replies = pipe.execute()
            out += self._book.found(lookups, replies)
        return out

    def close(self) -> None:
        self._redis.close()
