"""The scheduler's methods for agents and rollouts (a mixin of `Scheduler`, kept apart for
size): resolving a task's agent as it arrives, shadow copies, the rollout rule on the tick,
and the calls the pool's handle makes (`pool.agents`, `pool.rollouts`)."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from agentpool.errors import AgentPoolError, RetryLater
from agentpool.models import AgentTask
from agentpool.rollouts import Rollout
from agentpool.scheduler.agent_desk import AgentDesk

if TYPE_CHECKING:
    from agentpool.cluster.store import ResultStore
    from agentpool.config import PoolConfig
    from agentpool.scheduler.jobs import Job

log = logging.getLogger("agentpool.scheduler")

#: How often the rollout rule looks at the figures.
ROLLOUT_TICK_S = 1.0
#: Refusals of tasks whose agent did not resolve, kept until their admission reads them.
_MAX_REFUSALS = 10_000


class AgentControl:
    config: PoolConfig
    _store: ResultStore

    if TYPE_CHECKING:  # Scheduler's; declared here for the type checker only

        def _job_for(self, task: AgentTask, context: str, after: tuple[str, ...] = ()) -> Job: ...

    def _init_agents(self) -> None:
        self._agents = AgentDesk(lambda: self._store.redis, self._store.keys, self.config.name)
        self._agent_refusals: dict[str, AgentPoolError] = {}
        self._agents_lock = asyncio.Lock()
        self._agents_looked = 0.0

    async def _load_agents(self) -> None:
        """Reads the registry and this pool's rollouts (at boot: a restarted scheduler goes
        on with its live rollouts). Redis away: the first task naming an agent tries again."""
        try:
            async with self._agents_lock:
                await self._agents.reload()
        except Exception as exc:
            log.warning("could not read the agent registry at boot: %s", exc)

    def _names_agent(self, task: AgentTask) -> bool:
        """Whether the task is to be resolved against the registry (it, or its tenant's
        default, names an agent, and it was not resolved before)."""
        if task.agent_version is not None:
            return False
        if task.agent is not None:
            return True
        policy = self.config.policy_for(task.tenant)
        return policy is not None and policy.agent is not None and not task.spells_an_agent

    async def _with_agents(self, tasks: list[AgentTask]) -> list[AgentTask]:
        """The tasks with their agents resolved (a task whose agent does not resolve is kept
        as it is, and refused at admission), each sampled live task's shadow copy started."""
        if not any(self._names_agent(t) for t in tasks):
            return tasks
        unread: AgentPoolError | None = None
        if not self._agents.loaded:
            try:
                async with self._agents_lock:
                    if not self._agents.loaded:
                        await self._agents.reload()
            except Exception as exc:  # Redis away: these tasks are refused, to be sent again
                log.warning("could not read the agent registry: %s", exc)
                unread = RetryLater("the agent registry cannot be read now", retry_after_s=1.0)
        out, copies = [], []
        for task in tasks:
            if not self._names_agent(task):
                out.append(task)
                continue
            policy = self.config.policy_for(task.tenant)
            resolved = unread or self._agents.resolve(task, policy.agent if policy is not None else None)
            if isinstance(resolved, AgentPoolError):
                self._agent_refusals[task.task_id] = resolved
                while len(self._agent_refusals) > _MAX_REFUSALS:
                    self._agent_refusals.pop(next(iter(self._agent_refusals)))
                out.append(task)
                continue
            out.append(resolved)
            copy = self._agents.shadow_copy(resolved)
            if copy is not None:
                copies.append(copy)
        if copies:  # after the live tasks: their jobs start as soon as this returns
            asyncio.get_running_loop().call_soon(self._start_copies, copies)
        return out

    def _start_copies(self, copies: list[AgentTask]) -> None:
        for copy in copies:
            try:
                self._job_for(copy, "")  # in a trace of its own
            except Exception:  # a shadow copy never stands in the live task's way
                log.exception("could not start the shadow copy %s", copy.task_id)

    def _agent_refusal(self, task: AgentTask) -> AgentPoolError | None:
        return self._agent_refusals.pop(task.task_id, None)

    def _observe_agent(self, task: AgentTask, result: Any) -> None:
        if task.variant is not None:
            self._agents.observe(task, result)

    async def _tick_agents(self) -> None:
        """Applies the rollout rule, once a `ROLLOUT_TICK_S` at most (from the scheduler's tick)."""
        now = time.monotonic()
        if now - self._agents_looked < ROLLOUT_TICK_S or not self._agents.states:
            return
        self._agents_looked = now
        try:
            await self._agents.tick(time.time())
        except Exception as exc:  # Redis away, say: the next tick tries again
            log.warning("the rollout rule could not run: %s", exc)

    # --- the pool handle's calls ---------------------------------------------------------

    async def reload_agents(self) -> int:
        """Reads the registry and rollouts again (after a registration). Returns how many
        agents there are."""
        async with self._agents_lock:
            await self._agents.reload()
        return len(self._agents.catalog.versions)

    async def start_rollout(self, rollout: Rollout) -> dict[str, Any]:
        async with self._agents_lock:
            await self._agents.start(rollout)
        return self._agents.status()[rollout.agent]

    async def steer_rollout(self, agent: str, promote: bool, reason: str = "") -> dict[str, Any]:
        async with self._agents_lock:
            if not self._agents.loaded:
                await self._agents.reload()
            await self._agents.steer(agent, promote, reason)
        return self._agents.status()[agent]

    async def rollout_status(self) -> dict[str, Any]:
        if not self._agents.loaded:
            async with self._agents_lock:
                await self._agents.reload()
        return self._agents.status()
