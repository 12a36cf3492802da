"""The exactly-once final record of a task, and its entry in the tenant's results stream."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from agentpool.cluster.connection import REDIS_DOWN, Scripted, StoreBase, raised
from agentpool.events import Event
from agentpool.models import AgentResult
from agentpool.redact import redact_record

log = logging.getLogger("agentpool.store")

# Writes the final record and its stream entry in one atomic step, only if no record exists
# for this task_id yet. A task that ran twice (after a crash, or submitted twice) therefore
# yields one record and one stream entry; the loser gets the winner's record back, so every
# caller returns the same result. Either way the task leaves the pool's backlog and its
# transient keys (checkpoint, lease, cancel flag, approval) go. Every key carries the
# tenant's hash tag: one slot in a cluster. The task's last events go to its tenant's stream,
# and to its own (KEYS[12]) unless those are off (a TTL of 0).
_WRITE_ONCE = """
redis.call('HDEL', KEYS[3], ARGV[2])
redis.call('ZREM', KEYS[8], ARGV[2])
redis.call('ZREM', KEYS[9], ARGV[2])
redis.call('ZREM', KEYS[10], ARGV[2])
redis.call('DEL', KEYS[4], KEYS[5], KEYS[6], KEYS[7])
local existing = redis.call('GET', KEYS[1])
if existing then return {0, existing} end
if tonumber(ARGV[4]) > 0 then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[4])
else
  redis.call('SET', KEYS[1], ARGV[1])
end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*', 'task_id', ARGV[2], 'status', ARGV[3], 'result', ARGV[1])
local task_ttl = tonumber(ARGV[8])
for i = 9, #ARGV, 5 do
  redis.call('XADD', KEYS[11], 'MAXLEN', '~', ARGV[6], '*', 'event', ARGV[i], 'task_id', ARGV[i + 1],
    'trace_id', ARGV[i + 2], 'ts', ARGV[i + 3], 'data', ARGV[i + 4])
  if task_ttl > 0 then
    redis.call('XADD', KEYS[12], 'MAXLEN', '~', ARGV[7], '*', 'event', ARGV[i], 'task_id', ARGV[i + 1],
      'trace_id', ARGV[i + 2], 'ts', ARGV[i + 3], 'data', ARGV[i + 4])
    redis.call('EXPIRE', KEYS[12], task_ttl)
  end
end
return {1, ARGV[1]}
"""
#: The fields of an event's stream entry, in the order `_WRITE_ONCE` takes them.
_EVENT_FIELDS = ("event", "task_id", "trace_id", "ts", "data")


class FinalRecords(StoreBase):
    async def write_result(
        self, result: AgentResult, *, events: Sequence[Event] = (), also: Sequence[Scripted] = ()
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
        """
        result = redact_record(result, self._pii(result.tenant))
        if self._outbox:  # keep order behind what is already waiting
            return self._wait_for_redis(result, events)
        entries = [self._entry(result.tenant, e, task_id=result.task_id, trace_id=result.trace_id) for e in events]

        def add(pipe: Any) -> int:
            for write in also:
                write.add_to(pipe)
            self._add_write(pipe, result, entries)
            return len(also) + 1

        try:
            results = await self._pipelined(add)
            created, stored = raised(results[-1])
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
            self.post(result.tenant, event, task_id=result.task_id, trace_id=result.trace_id)
        self._buffer(result)
        return result, True

    def _add_write(self, pipe: Any, result: AgentResult, entries: Sequence[dict[str, str]] = ()) -> None:
        t, task_id = result.tenant, result.task_id
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
                *(entry[field] for entry in entries for field in _EVENT_FIELDS),
            ),
        ).add_to(pipe)

    async def _write(self, result: AgentResult) -> tuple[AgentResult, bool]:
        pipe = self.redis.pipeline(transaction=False)
        self._add_write(pipe, result)
        ((created, stored),) = await pipe.execute()
        if created:
            return result, True
        return AgentResult.model_validate_json(stored), False

    if TYPE_CHECKING:  # EventLog's; declared here for the type checker only

        def _entry(self, tenant: str, event: Event, *, task_id: str, trace_id: str) -> dict[str, str]: ...

        def _logged(self, tenant: str, entry: dict[str, str]) -> None: ...

        def post(self, tenant: str, event: Event, *, task_id: str, trace_id: str) -> None: ...
