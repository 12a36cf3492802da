"""A run's lease on its task in Redis (`RunLease`, the worker's part), and how a fresh
task's first LLM call goes out while its begin is in flight (`confirmed`, `Superseded`)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from redis.exceptions import RedisError

from agentpool import events
from agentpool.actors.agent_loop import CallLLM
from agentpool.actors.llm import LLMResponse
from agentpool.cluster.store import RunStart
from agentpool.events import Emit
from agentpool.models import AgentResult
from agentpool.protocol import Dispatch

if TYPE_CHECKING:
    from agentpool.cluster.store import ResultStore
    from agentpool.config import PoolConfig

#: How often a run waiting on another run's lease looks again.
_LEASE_POLL_S = 0.5


class Superseded(Exception):
    """A fresh task's begin found what an earlier run left (or another run holding it)."""


def nothing_before(begun: RunStart | AgentResult) -> bool:
    """Whether a begin found what a task that never ran finds: a free lease (or Redis away),
    no checkpoint, cancel request, approval or record."""
    if isinstance(begun, AgentResult):
        return False
    free = begun.leased or begun.holder is None
    return free and begun.checkpoint is None and not begun.cancelled and begun.approval is None


def confirmed(call: CallLLM, confirm: Callable[[], Awaitable[None]]) -> CallLLM:
    """`call`, each answer returned only once `confirm` has passed."""

    async def call_llm(request: dict[str, Any], models: list[str], emit: Emit) -> LLMResponse:
        response = await call(request, models, emit)
        await confirm()
        return response

    return call_llm


class RunLease:
    """The worker's lease on each task it runs: taken at the run's begin, renewed while it
    runs, released when it pauses."""

    if TYPE_CHECKING:  # the worker's
        config: PoolConfig
        _store: ResultStore

    async def _begin(self, dispatch: Dispatch, emit: Any) -> RunStart | AgentResult:
        """Takes the task's lease, or waits while another live run holds it: for that run's
        record, or for its lease to lapse (its process died). With Redis away, the task runs
        without lease or checkpoint rather than not at all."""
        task = dispatch.task
        lease_ms = int(self.config.run_lease_s * 1000)
        waited = False
        while True:
            try:
                begun = await self._store.begin(task.tenant, task.task_id, dispatch.run_id, lease_ms)
            except (RedisError, OSError):
                return RunStart()
            if begun.result is not None:
                return begun.result
            if begun.leased or begun.holder in (None, dispatch.run_id):
                return begun
            if not waited:
                waited = True
                await emit(events.LeaseWait(holder=begun.holder))
            await asyncio.sleep(_LEASE_POLL_S)

    async def _renew(self, dispatch: Dispatch) -> None:
        lease_ms = int(self.config.run_lease_s * 1000)
        task = dispatch.task
        while True:
            await asyncio.sleep(self.config.run_lease_s / 3)
            with contextlib.suppress(RedisError, OSError):
                await self._store.renew_lease(task.tenant, task.task_id, dispatch.run_id, lease_ms)

    async def _release(self, dispatch: Dispatch) -> None:
        with contextlib.suppress(RedisError, OSError):
            await self._store.release_lease(dispatch.task.tenant, dispatch.task.task_id, dispatch.run_id)
