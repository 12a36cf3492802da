"""The exactly-once final record of a task, and its entry in the tenant's results stream."""

from __future__ import annotations

from agentpool.cluster.connection import REDIS_DOWN, StoreBase
from agentpool.models import AgentResult
from agentpool.redact import redact_record

# Writes the final record and its stream entry in one atomic step, only if no record exists
# for this task_id yet. A task that ran twice (after a crash, or submitted twice) therefore
# yields one record and one stream entry; the loser gets the winner's record back, so every
# caller returns the same result. Either way the task leaves the pool's backlog and its
# transient keys (checkpoint, lease, cancel flag, approval) go. Every key carries the
# tenant's hash tag: one slot in a cluster.
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
return {1, ARGV[1]}
"""


class FinalRecords(StoreBase):
    async def write_result(self, result: AgentResult) -> tuple[AgentResult, bool]:
        """Writes the final record unless one exists. Returns (the stored record, created).

        If Redis is unreachable the record waits in the outbox, and is reported as created:
        the caller has no other record to return. The tenant's PII redaction applies to the
        answer and the error message first; the record returned is the one written.
        """
        result = redact_record(result, self._pii(result.tenant))
        if self._outbox:  # keep order behind what is already waiting
            self._buffer(result)
            return result, True
        try:
            return await self._write(result)
        except REDIS_DOWN as exc:
            self._down(exc)
            self._buffer(result)
            return result, True

    async def _write(self, result: AgentResult) -> tuple[AgentResult, bool]:
        t, task_id = result.tenant, result.task_id
        created, stored = await self._script("write", _WRITE_ONCE)(
            keys=[
                self.keys.result(t, task_id),
                self.keys.results(t),
                self.keys.admitted(t, self.pool),
                *self.keys.task_keys(t, task_id),
                *self.keys.backlogs(t, self.pool),
            ],
            args=[result.model_dump_json(), task_id, result.status, self._ttl, self._maxlen],
        )
        if created:
            return result, True
        return AgentResult.model_validate_json(stored), False
