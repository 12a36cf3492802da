"""Where one task stands now: `Scheduler.where`, behind `pool.get` and `GET /v1/runs/{id}`
(a mixin of `Scheduler`, kept apart for size)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from redis.exceptions import RedisError

from agentpool import events
from agentpool.models import TaskState
from agentpool.redact import redact
from agentpool.scheduler.jobs import Job
from agentpool.vocabulary import TaskPhase

if TYPE_CHECKING:
    from agentpool.cluster.store import ResultStore
    from agentpool.scheduler.core import SchedulerCore


class TaskLookup:
    """`where()`: one task's phase, place in the queue, progress or final record."""

    _jobs: dict[str, Job]
    _deferred: dict[str, Job]
    _store: ResultStore
    _core: SchedulerCore[Job]

    if TYPE_CHECKING:  # SessionGate's; declared here for the type checker only

        def session_place(self, job: Job) -> int | None: ...

    async def where(self, task_id: str, tenant: str | None = None, *, progress: bool = True) -> TaskState | None:
        """Where the task stands: queued (its place among its tenant's tasks, and when it
        should start), running or awaiting approval (the run's attempt, its LLM turns and
        usage so far, the approval asked for), or finished (its record). With `tenant`, only
        that tenant's task is looked for, its final record included; without, a task this
        scheduler does not hold (finished, or only in the Redis backlog of a tenant with no
        task in memory) is None.

        Raises:
            RedisError: If Redis is needed (a task not in memory) and cannot answer.
        """
        job = self._jobs.get(task_id) or self._deferred.get(task_id)
        if job is not None and tenant in (None, job.task.tenant):
            return await self._state_of(job, progress)
        tenants = [tenant] if tenant is not None else sorted(self._core.queue.backlogged())
        found = await self._store.find_admitted(tenants, task_id)
        if found is not None:
            owner = found[0]
            place = await self._store.backlog_place(owner, task_id)
            if place is not None:
                return TaskState(
                    task_id=task_id,
                    tenant=owner,
                    phase=TaskPhase.QUEUED,
                    place=self._core.queue.length(owner) + place,
                )
        if tenant is None:
            return None
        result = await self._store.read_result(tenant, task_id)
        if result is None:
            return None
        return TaskState(task_id=task_id, tenant=tenant, phase=TaskPhase.FINISHED, result=result)

    def active(self, tenant: str, limit: int = 200) -> list[TaskState]:
        """The tenant's tasks this scheduler holds (queued, running, paused), at most `limit`,
        without their progress (`where` gives one task's)."""
        out: list[TaskState] = []
        for job in (*self._jobs.values(), *self._deferred.values()):
            if job.task.tenant != tenant:
                continue
            phase = {"running": TaskPhase.RUNNING, "paused": TaskPhase.AWAITING_APPROVAL}.get(
                job.state, TaskPhase.QUEUED
            )
            out.append(TaskState(task_id=job.task.task_id, tenant=tenant, phase=phase, attempt=job.attempt))
            if len(out) >= limit:
                break
        return out

    async def _state_of(self, job: Job, progress: bool) -> TaskState:
        task = job.task
        state = TaskState(task_id=task.task_id, tenant=task.tenant, phase=TaskPhase.QUEUED)
        if job.state == "waiting":  # for its session's turn: its place in the session's line
            state.place = self.session_place(job)
            return state
        if job.state in ("admitting", "queued") and job.attempt == 1 and job.paused is None:
            standing = self._core.standing(job.ticket)
            if standing is not None:
                state.place, wait_s = standing
                state.predicted_start_unix = round(time.time() + wait_s, 3)
            elif task.task_id in self._deferred:  # in the Redis backlog, with a caller waiting
                place = await self._store.backlog_place(task.tenant, task.task_id)
                if place is not None:
                    state.place = self._core.queue.length(task.tenant) + place
            return state
        state.attempt = job.attempt
        state.phase = TaskPhase.AWAITING_APPROVAL if job.state == "paused" else TaskPhase.RUNNING
        if job.state == "queued":  # between two runs (its worker died, its approval came)
            state.phase = TaskPhase.QUEUED
        if job.paused is not None and job.state == "paused":
            paused = job.paused
            state.approval = {
                "tools": paused.tools,
                "arguments": redact(paused.arguments, pii=False),
                "requested_unix": paused.requested_unix,
                "deadline_unix": paused.deadline_unix,
            }
        if not progress:
            return state
        try:
            entries = await self._store.task_events(task.tenant, task.task_id)
        except (RedisError, OSError):  # the phase stands without its progress
            return state
        state.iteration, state.usage = events.progress(events.EventEntry.from_stream(i, f) for i, f in entries)
        return state
