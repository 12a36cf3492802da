"""The admission journal: the tasks a pool accepted and has not finished, by tenant (what a
restarted scheduler adopts)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from agentpool.cluster.connection import REDIS_DOWN, StoreBase
from agentpool.errors import StoreError
from agentpool.models import AgentResult, AgentTask

# Records an admission unless the task already has a final record (then returns it) or was
# admitted before. Returns {record or false, 1 if admitted before}.
_ADMIT = """
local existing = redis.call('GET', KEYS[1])
if existing then return {existing, 1} end
return {false, 1 - redis.call('HSETNX', KEYS[2], ARGV[1], ARGV[2])}
"""


class Journal(StoreBase):
    async def admit(self, task: AgentTask, entry: str) -> tuple[AgentResult | None, bool]:
        """Records the task as accepted by this pool (unless it already was) and looks up its
        final record. Returns (the final record or None, whether it was accepted before).

        Calls made in the same turn of the event loop (a batch arriving at the scheduler)
        share one pipelined round trip. If Redis is away the admission waits in the outbox.
        """
        future: asyncio.Future[tuple[str | None, bool]] = asyncio.get_running_loop().create_future()
        self._lookups.append((task, entry, future))
        if len(self._lookups) == 1:
            asyncio.get_running_loop().call_soon(self._start_lookups)
        raw, known = await future
        return (AgentResult.model_validate_json(raw) if raw else None), known

    def _start_lookups(self) -> None:
        batch, self._lookups = self._lookups, []
        self._spawn(self._lookup(batch))

    async def _lookup(self, batch: list[tuple[AgentTask, str, asyncio.Future[tuple[str | None, bool]]]]) -> None:
        try:
            pipe = self.redis.pipeline(transaction=False)
            for task, entry, _ in batch:
                keys = [self.keys.result(task.tenant, task.task_id), self.keys.admitted(task.tenant, self.pool)]
                await self._script("admit", _ADMIT)(keys=keys, args=[task.task_id, entry], client=pipe)
            values = await pipe.execute()
        except REDIS_DOWN as exc:
            self._down(exc)
            for task, entry, future in batch:
                self._buffer((self.keys.admitted(task.tenant, self.pool), task.task_id, entry))
                if not future.done():
                    future.set_result((None, False))
            return
        except Exception as exc:  # anything else: every caller hears of it, none waits forever
            for _, _, future in batch:
                if not future.done():
                    future.set_exception(StoreError(f"admission could not be recorded: {exc}"))
            return
        for (_, _, future), (raw, known) in zip(batch, values, strict=True):
            if not future.done():
                future.set_result((raw or None, bool(known)))

    async def admissions(self) -> AsyncIterator[tuple[str, str, str]]:
        """Every task this pool accepted and has not finished: (tenant, task_id, entry)."""
        pattern = self.keys.admitted_pattern(self.pool)
        async for key in self.redis.scan_iter(match=pattern, count=1000):
            tenant = key[key.index("{") + 1 : key.index("}")]
            async for task_id, entry in self.redis.hscan_iter(key, count=1000):
                yield tenant, task_id, entry
