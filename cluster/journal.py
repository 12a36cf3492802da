"""The backlog: every task a pool accepted and has not finished, in Redis, by tenant and
priority class, in arrival order. It is also the admission journal: what dispatch reads is
what a restarted scheduler reads, so crash recovery has nothing else to consult.

Per tenant (every key under the tenant's hash tag, so one Lua step may touch them all):
- `admitted:<pool>`, a hash task_id -> the accepted task (`protocol.Admitted` JSON);
- `backlog:<pool>:<priority>`, a sorted set task_id -> arrival number, one per class;
- `arrivals:<pool>`, the counter the arrival numbers come from.

A task enters both in one step (`admit`) and leaves both in the step that writes its final
record (`cluster.records`). The scheduler reads the backlog forward from a cursor
(`pull`): each call returns the next tasks after it, skips (and clears) entries whose task
has ended, and says how many are left, so the scheduler holds in memory only the window it
is about to dispatch and a count per tenant and class.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from agentpool.cluster.connection import REDIS_DOWN, PendingAdmission, Scripted, StoreBase
from agentpool.errors import StoreError
from agentpool.models import AgentResult, AgentTask

# Records an admission unless the task already has a final record (then returns it) or was
# admitted before; a new admission takes the tenant's next arrival number and joins its
# class's backlog. Returns {record or false, 1 if admitted before, its arrival number (0 if
# it has none in this class's backlog)}.
_ADMIT = """
local existing = redis.call('GET', KEYS[1])
if existing then return {existing, 1, 0} end
if redis.call('HSETNX', KEYS[2], ARGV[1], ARGV[2]) == 0 then
  return {false, 1, tonumber(redis.call('ZSCORE', KEYS[3], ARGV[1]) or 0)}
end
local seq = redis.call('INCR', KEYS[4])
redis.call('ZADD', KEYS[3], seq, ARGV[1])
return {false, 0, seq}
"""

# The next tasks of one backlog set after arrival number ARGV[1] (exclusive), at most
# ARGV[2]; entries whose task has ended (no admission left) are removed on the way.
# Returns {flat list of task_id, arrival, admission; the last arrival read; entries left}.
_PULL = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. ARGV[1], '+inf', 'WITHSCORES', 'LIMIT', 0, ARGV[2])
local out = {}
local last = ARGV[1]
for i = 1, #ids, 2 do
  local entry = redis.call('HGET', KEYS[2], ids[i])
  last = ids[i + 1]
  if entry then
    out[#out + 1] = ids[i]
    out[#out + 1] = ids[i + 1]
    out[#out + 1] = entry
  else
    redis.call('ZREM', KEYS[1], ids[i])
  end
end
return {out, last, redis.call('ZCOUNT', KEYS[1], '(' .. last, '+inf')}
"""


@dataclass(frozen=True)
class Admission:
    """What `admit` found: the task's final record if it has one, whether it was accepted
    before, and its arrival number in the backlog (0 if it has none: a record, or Redis away)."""

    record: AgentResult | None
    known: bool
    arrival: int = 0


@dataclass(frozen=True)
class Pulled:
    """One `pull`: the tasks read (task_id, arrival number, admission JSON), the cursor to
    read on from, and how many entries are left after it."""

    entries: list[tuple[str, int, str]]
    cursor: str
    left: int


class Journal(StoreBase):
    async def admit(self, task: AgentTask, entry: str) -> Admission:
        """Records the task as accepted by this pool (unless it already was), in its tenant's
        backlog, and looks up its final record.

        Calls made in the same turn of the event loop (a batch arriving at the scheduler)
        share one pipelined round trip. If Redis is away the admission waits in the outbox
        and the task is reported as new, with no arrival number (0).
        """
        [admission] = await self.admit_many([PendingAdmission(task, entry)])
        return admission

    async def admit_many(self, pending: Sequence[PendingAdmission]) -> list[Admission]:
        """`admit` for several tasks at once (one round trip with the others of this turn)."""
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[Admission]] = [loop.create_future() for _ in pending]
        if not self._lookups:
            loop.call_soon(self._start_lookups)
        self._lookups.extend(zip(pending, futures, strict=True))
        return list(await asyncio.gather(*futures))

    def _start_lookups(self) -> None:
        batch, self._lookups = self._lookups, []
        self._spawn(self._lookup(batch))

    def _admit_keys(self, task: AgentTask) -> list[str]:
        t = task.tenant
        return [
            self.keys.result(t, task.task_id),
            self.keys.admitted(t, self.pool),
            self.keys.backlog(t, self.pool, task.priority),
            self.keys.arrivals(t, self.pool),
        ]

    async def _lookup(self, batch: list[tuple[PendingAdmission, asyncio.Future[Admission]]]) -> None:
        try:
            pipe = self.redis.pipeline(transaction=False)
            written: list[str] = []
            for pending, _ in batch:
                keys = self._admit_keys(pending.task)
                Scripted(_ADMIT, tuple(keys), (pending.task.task_id, pending.entry)).add_to(pipe)
                written.append(keys[0])
            waits = self._add_wait(pipe, written)
            values = await pipe.execute()
            if waits:
                self._check_wait(values[-waits:])
                del values[-waits:]
        except REDIS_DOWN as exc:
            self._down(exc)
            for pending, future in batch:
                self._buffer(pending)
                if not future.done():
                    future.set_result(Admission(None, False))
            return
        except Exception as exc:  # anything else: every caller hears of it, none waits forever
            for _, future in batch:
                if not future.done():
                    future.set_exception(StoreError(f"admission could not be recorded: {exc}"))
            return
        for (_, future), (raw, known, arrival) in zip(batch, values, strict=True):
            if not future.done():
                record = AgentResult.model_validate_json(raw) if raw else None
                future.set_result(Admission(record, bool(known), int(arrival)))

    async def _admit_again(self, pending: PendingAdmission) -> None:
        """An admission the outbox kept while Redis was away, recorded now."""
        task = pending.task
        await self._script("admit", _ADMIT)(keys=self._admit_keys(task), args=[task.task_id, pending.entry])

    async def pull(self, reads: Sequence[tuple[str, str, str, int]]) -> list[Pulled]:
        """Reads on in several backlog sets in one round trip: per (tenant, priority,
        cursor, at most), the next tasks after the cursor (`"-inf"` from the start)."""
        pipe = self.redis.pipeline(transaction=False)
        for tenant, priority, cursor, limit in reads:
            keys = (self.keys.backlog(tenant, self.pool, priority), self.keys.admitted(tenant, self.pool))
            Scripted(_PULL, keys, (cursor, limit)).add_to(pipe)
        out = []
        for flat, last, left in await pipe.execute():
            entries = [(flat[i], int(float(flat[i + 1])), flat[i + 2]) for i in range(0, len(flat), 3)]
            out.append(Pulled(entries, str(last), int(left)))
        return out

    async def backlog_sizes(self) -> AsyncIterator[tuple[str, str, int]]:
        """Every non-empty backlog set of this pool: (tenant, priority, entries)."""
        async for key in self.redis.scan_iter(match=self.keys.backlog_pattern(self.pool), count=1000):
            tenant = key[key.index("{") + 1 : key.index("}")]
            size = await self.redis.zcard(key)
            if size:
                yield tenant, key.rsplit(":", 1)[1], int(size)

    async def backlog_place(self, tenant: str, task_id: str) -> int | None:
        """How many of the tenant's tasks go before `task_id` in its backlog here (classes
        in order, then arrival); None if it is not in the backlog."""
        pipe = self.redis.pipeline(transaction=False)
        for key in self.keys.backlogs(tenant, self.pool):
            pipe.zrank(key, task_id)
            pipe.zcard(key)
        replies = await pipe.execute()
        before = 0
        for rank, size in zip(replies[::2], replies[1::2], strict=True):
            if rank is not None:
                return before + int(rank)
            before += int(size)
        return None

    async def find_admitted(self, tenants: Sequence[str], task_id: str) -> tuple[str, str] | None:
        """Which of `tenants` has `task_id` accepted and unfinished here: (tenant, admission)."""
        if not tenants:
            return None
        pipe = self.redis.pipeline(transaction=False)
        for tenant in tenants:
            pipe.hget(self.keys.admitted(tenant, self.pool), task_id)
        for tenant, entry in zip(tenants, await pipe.execute(), strict=True):
            if entry is not None:
                return tenant, entry
        return None
