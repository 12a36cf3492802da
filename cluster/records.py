"""The exactly-once final record of a task, and its entry in the tenant's results stream."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from agentpool.cluster.connection import REDIS_DOWN, Scripted, StoreBase, raised
from agentpool.cluster.sessions import SessionWrite
from agentpool.events import AgentTag, Event
from agentpool.models import AgentResult
from agentpool.redact import redact_record

log = logging.getLogger("agentpool.store")

# Writes the final record and its stream entry in one atomic step, only if no record exists
# for this task_id yet. A task that ran twice (after a crash, or submitted twice) therefore
# yields one record and one stream entry; the loser gets the winner's record back, so every
# caller returns the same result. Either way the task leaves the pool's backlog and its
# transient keys (checkpoint, lease, cancel flag, approval) go. Every key carries the
# tenant's hash tag: one slot in a cluster. The task's last events go to its tenant's stream,
# and to its own (KEYS[12]) unless those are off (a TTL of 0). A session's task (ARGV[13])
# is indexed with its session, and its turns (ARGV[9], the whole new history) replace the
# session's history in the same step, only if the session is still at the version the run
# started from (ARGV[10]); otherwise the history is left alone and the reply says so.
_WRITE_ONCE = """
redis.call('HDEL', KEYS[3], ARGV[2])
redis.call('ZREM', KEYS[8], ARGV[2])
redis.call('ZREM', KEYS[9], ARGV[2])
redis.call('ZREM', KEYS[10], ARGV[2])
redis.call('DEL', KEYS[4], KEYS[5], KEYS[6], KEYS[7])
local existing = redis.call('GET', KEYS[1])
if existing then return {0, existing, 0} end
if tonumber(ARGV[4]) > 0 then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[4])
else
  redis.call('SET', KEYS[1], ARGV[1])
end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*', 'task_id', ARGV[2], 'status', ARGV[3], 'result', ARGV[1])
local conflict = 0
if ARGV[13] ~= '' then
  local now = tonumber(ARGV[12])
  local ttl = tonumber(ARGV[11])
  redis.call('ZADD', KEYS[14], now, ARGV[2])
  redis.call('EXPIRE', KEYS[14], ttl)
  redis.call('ZADD', KEYS[15], now, ARGV[13])
  redis.call('ZREMRANGEBYSCORE', KEYS[15], '-inf', '(' .. (now - ttl))
  if ARGV[9] ~= '' then
    local version = tonumber(redis.call('HGET', KEYS[13], 'version') or '0')
    if version == tonumber(ARGV[10]) then
      redis.call('HSET', KEYS[13], 'messages', ARGV[9], 'version', version + 1, 'updated', ARGV[12],
        'last_task', ARGV[2])
      redis.call('HINCRBY', KEYS[13], 'turns', 1)
      redis.call('HINCRBY', KEYS[13], 'compactions', ARGV[14])
    else
      conflict = 1
    end
  end
  if redis.call('EXISTS', KEYS[13]) == 1 then redis.call('EXPIRE', KEYS[13], ttl) end
end
local task_ttl = tonumber(ARGV[8])
for i = 15, #ARGV, 7 do
  local entry = {'event', ARGV[i], 'task_id', ARGV[i + 1], 'trace_id', ARGV[i + 2], 'ts', ARGV[i + 3],
    'data', ARGV[i + 4]}
  if ARGV[i + 5] ~= '' then
    entry[11], entry[12], entry[13], entry[14] = 'agent', ARGV[i + 5], 'agent_version', ARGV[i + 6]
  end
  redis.call('XADD', KEYS[11], 'MAXLEN', '~', ARGV[6], '*', unpack(entry))
  if task_ttl > 0 then
    redis.call('XADD', KEYS[12], 'MAXLEN', '~', ARGV[7], '*', unpack(entry))
    redis.call('EXPIRE', KEYS[12], task_ttl)
  end
end
return {1, ARGV[1], conflict}
"""
#: The fields of an event's stream entry, in the order `_WRITE_ONCE` takes them.
_EVENT_FIELDS = ("event", "task_id", "trace_id", "ts", "data", "agent", "agent_version")


class FinalRecords(StoreBase):
    async def write_result(
        self,
        result: AgentResult,
        *,
        events: Sequence[Event] = (),
        also: Sequence[Scripted] = (),
        session: SessionWrite | None = None,
    ) -> tuple[AgentResult, bool]:
        """Writes the final record unless one exists. Returns (the stored record, created).

        One round trip: the events queued in this process go first, then `also` (the task's
        usage, say), then the record, with `events` (the task's last ones) added to the
        tenant's stream in the same atomic step only if this write creates the record. So a
        record's events are in Redis when it is, and a task that ran twice ends once.

        If Redis is unreachable the record waits in the outbox, and is reported as created:
        the caller has no other record to return; its `events` wait with the other events.
        The tenant's PII redaction applies to the answer and the error message first; the
        record returned is the one written.

        With `session`, a session's task is indexed with its session, and its turns stored
        in the same atomic step (only if this write creates the record); a session that
        moved on meanwhile keeps its history (logged: it cannot happen while the scheduler
        runs one task of a session at a time).
        """
        result = redact_record(result, self._pii(result.tenant))
        if result.session_id is not None:
            self._session_writes[result.task_id] = session or SessionWrite(
                result.session_id, None, 0, self._session_ttl(result.tenant)
            )
        if self._outbox:  # keep order behind what is already waiting
            return self._wait_for_redis(result, events)
        tag = (result.agent, result.agent_version)
        entries = [
            self._entry(result.tenant, e, task_id=result.task_id, trace_id=result.trace_id, agent=tag) for e in events
        ]

        def add(pipe: Any) -> int:
            for write in also:
                write.add_to(pipe)
            self._add_write(pipe, result, entries)
            return len(also) + 1

        try:
            results = await self._pipelined(add)
            created, stored, conflict = raised(results[-1])
            self._session_writes.pop(result.task_id, None)
            if conflict:
                log.error("task %s ended after its session moved on: its turns were not stored", result.task_id)
            for failed in (r for r in results[:-1] if isinstance(r, Exception)):
                log.warning("a write sent with the record of task %s failed: %s", result.task_id, failed)
        except REDIS_DOWN as exc:
            self._down(exc)
            return self._wait_for_redis(result, events)
        if not created:
            return AgentResult.model_validate_json(stored), False
        for entry in entries:
            self._logged(result.tenant, entry)
        return result, True

    async def read_result(self, tenant: str, task_id: str) -> AgentResult | None:
        """The task's final record, or None if it has none (yet)."""
        raw = await self.redis.get(self.keys.result(tenant, task_id))
        return AgentResult.model_validate_json(raw) if raw else None

    def _wait_for_redis(self, result: AgentResult, events: Sequence[Event]) -> tuple[AgentResult, bool]:
        for event in events:
            tag = (result.agent, result.agent_version)
            self.post(result.tenant, event, task_id=result.task_id, trace_id=result.trace_id, agent=tag)
        self._buffer(result)
        return result, True

    def _add_write(self, pipe: Any, result: AgentResult, entries: Sequence[dict[str, str]] = ()) -> None:
        t, task_id = result.tenant, result.task_id
        session = self._session_writes.get(task_id)  # popped once the write is through
        sid = session.session_id if session is not None else None
        Scripted(
            _WRITE_ONCE,
            keys=(
                self.keys.result(t, task_id),
                self.keys.results(t),
                self.keys.admitted(t, self.pool),
                *self.keys.task_keys(t, task_id),
                *self.keys.backlogs(t, self.pool),
                self.keys.events(t),
                self.keys.task_events(t, task_id),
                # Not a session's task: any key of the tenant's slot fills the places.
                self.keys.session(t, sid) if sid else self.keys.results(t),
                self.keys.session_tasks(t, sid) if sid else self.keys.results(t),
                self.keys.sessions(t),
            ),
            args=(
                result.model_dump_json(),
                task_id,
                result.status,
                self._ttl,
                self._maxlen,
                self._maxlen,
                self._task_events_maxlen,
                self._task_events_ttl,
                session.messages or "" if session is not None else "",
                session.expected_version if session is not None else 0,
                session.ttl_s if session is not None else 0,
                time.time(),
                sid or "",
                session.compactions if session is not None else 0,
                *(entry.get(field, "") for entry in entries for field in _EVENT_FIELDS),
            ),
        ).add_to(pipe)

    async def _write(self, result: AgentResult) -> tuple[AgentResult, bool]:
        pipe = self.redis.pipeline(transaction=False)
        self._add_write(pipe, result)
        waits = self._add_wait(pipe, [self.keys.result(result.tenant, result.task_id)])
        replies = await pipe.execute()
        if waits:
            self._check_wait(replies[-waits:])
            del replies[-waits:]
        ((created, stored, _),) = replies
        self._session_writes.pop(result.task_id, None)
        if created:
            return result, True
        return AgentResult.model_validate_json(stored), False

    if TYPE_CHECKING:  # EventLog's; declared here for the type checker only

        def _entry(
            self, tenant: str, event: Event, *, task_id: str, trace_id: str, agent: AgentTag = (None, None)
        ) -> dict[str, str]: ...

        def _logged(self, tenant: str, entry: dict[str, str]) -> None: ...

        def post(
            self, tenant: str, event: Event, *, task_id: str, trace_id: str, agent: AgentTag = (None, None)
        ) -> None: ...
