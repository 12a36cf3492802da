"""A task's runs: the lease that keeps two runs of a task from running at once, its
checkpoint, and the marks a later run reads as it starts (cancel request, approval)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from agentpool.cluster.connection import Scripted, StoreBase, raised
from agentpool.models import AgentResult

# Refreshes a run's lease, or deletes it (ARGV[2] == 0), only while that run holds it.
_LEASE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if tonumber(ARGV[2]) > 0 then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return redis.call('DEL', KEYS[1])
"""
# Takes a run's lease (KEYS[2]) unless another run holds it, and reads what an earlier run
# left, in one step: the lease's holder, the checkpoint (KEYS[1]), a cancel mark (KEYS[3]),
# an approval decision (KEYS[4]) and the final record (KEYS[5]). A missing value comes back
# false (RESP3) or nil (RESP2).
_BEGIN = """
local leased = redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) and 1 or 0
return {leased, redis.call('GET', KEYS[2]), redis.call('GET', KEYS[1]), redis.call('EXISTS', KEYS[3]),
  redis.call('GET', KEYS[4]), redis.call('GET', KEYS[5])}
"""


@dataclass
class RunStart:
    """What a run finds in Redis as it starts (one round trip); by default, nothing."""

    leased: bool = False
    holder: str | None = None
    checkpoint: str | None = None
    cancelled: bool = False
    approval: str | None = None
    result: AgentResult | None = None


class Runs(StoreBase):
    async def begin(self, tenant: str, task_id: str, run_id: str, lease_ms: int) -> RunStart:
        """Takes the task's lease (unless another run holds it) and reads what an earlier run
        left: its checkpoint, a cancel request, an approval decision, or its final record."""
        checkpoint, lease, cancel, approval = self.keys.task_keys(tenant, task_id)
        # One script, not six commands: a task's begin is on every run's path.
        begin = Scripted(
            _BEGIN, (checkpoint, lease, cancel, approval, self.keys.result(tenant, task_id)), (run_id, lease_ms)
        )

        def add(pipe: Any) -> int:
            begin.add_to(pipe)
            return 1

        (found,) = await self._pipelined(add)
        leased, holder, saved, cancelled, decision, raw = (value or None for value in raised(found))
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
        lease = self._script("lease", _LEASE)
        return bool(await lease(keys=[self.keys.lease(tenant, task_id)], args=[run_id, lease_ms]))

    async def release_lease(self, tenant: str, task_id: str, run_id: str) -> bool:
        """Frees the lease if this run holds it (a run whose process died, say)."""
        lease = self._script("lease", _LEASE)
        return bool(await lease(keys=[self.keys.lease(tenant, task_id)], args=[run_id, 0]))

    async def mark_cancelled(self, tenant: str, task_id: str, reason: str) -> None:
        """Tells a run of the task that starts or resumes later (anywhere) to end at once."""
        await self.redis.set(self.keys.cancel(tenant, task_id), reason, ex=86_400)

    async def save_checkpoint(
        self, tenant: str, task_id: str, payload: str, ttl_s: int, also: Sequence[Scripted] = ()
    ) -> None:
        """Saves a run's state, and `also` (the usage of the calls it holds) in the same round trip."""
        key = self.keys.checkpoint(tenant, task_id)

        def add(pipe: Any) -> int:
            pipe.set(key, payload, ex=ttl_s)
            for write in also:
                write.add_to(pipe)
            return 1 + len(also)

        raised((await self._pipelined(add))[0])
