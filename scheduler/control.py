"""The scheduler's durable side: taking up accepted work after a restart, detached
submission, approvals and cancellation (a mixin of `Scheduler`, kept apart for size).

Every method here acts on `Job`s and keeps what must outlive the scheduler in Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

import ray
from redis.exceptions import RedisError

from agentpool import events
from agentpool.background import withdraw_calls
from agentpool.models import AgentResult, AgentTask
from agentpool.protocol import ApprovalDecision, Paused
from agentpool.redact import redact
from agentpool.scheduler.jobs import Job, trace_context
from agentpool.scheduler.records import failed_record
from agentpool.vocabulary import OnBusy

if TYPE_CHECKING:
    from agentpool.cluster.approvals import Approvals
    from agentpool.cluster.store import ResultStore
    from agentpool.scheduler.core import SchedulerCore
    from agentpool.scheduler.fleet import WorkerFleet


log = logging.getLogger("agentpool.scheduler")

#: How long `status()` waits for the workers' Redis backlogs.
_BACKLOG_WAIT_S = 1.0


class CancelledInQueue(Exception):
    """Set on a queued job's slot when it is cancelled before it ran."""


class JobControl:
    """Boot recovery, `enqueue`, `approve`, `pending_approvals`, `cancel`, and what status
    reports of them."""

    _jobs: dict[str, Job]
    _store: ResultStore
    _core: SchedulerCore[Job]
    _fleet: WorkerFleet
    _approvals: Approvals
    _counts: Counter[str]
    _durable: Counter[str]
    _booted: bool
    #: Set once boot has read back the live configuration and a drain in progress: until
    #: then a restarted scheduler takes no work and reports no state (`run`, `enqueue`,
    #: `status` wait for it), so a drain outlives a restart without a gap.
    _loaded: asyncio.Event
    _deferred: dict[str, Job]
    _callers: set[asyncio.Task[Any]]

    if TYPE_CHECKING:  # Scheduler's; declared here for the type checker only

        def _start(
            self,
            task: AgentTask,
            traceparent: str,
            *,
            adopted: bool = False,
            admitted_unix: float = 0.0,
            after: tuple[str, ...] = (),
        ) -> Job: ...

        def _spawn_write(self, result: AgentResult) -> None: ...

        async def _with_agents(self, tasks: list[AgentTask]) -> list[AgentTask]: ...

        async def _load_agents(self) -> None: ...
        async def _load_live(self) -> None: ...
        async def _load_drain(self) -> None: ...

        async def _count_backlog(self) -> int: ...

        async def _find_backlogged(self, task_id: str) -> Job | None: ...

        def _left_backlog(self, task: AgentTask) -> None: ...

        async def _cancelled(self, job: Job) -> AgentResult: ...

        def _cancel_waiting(self, job: Job) -> bool: ...

        def _admits_in_batch(self, task: AgentTask, ahead: int, *, reply: bool) -> bool: ...

        async def _admit_batch(
            self, tasks: list[AgentTask], contexts: list[str], reply: bool
        ) -> list[AgentResult | None]: ...

    def _job_for(self, task: AgentTask, context: str, after: tuple[str, ...] = ()) -> Job:
        """The task's job: the one already under way for its id, or a new one. Never raises:
        a job that cannot start (a bug of ours) comes back done, `failed`, saying why."""
        job = self._jobs.get(task.task_id) or self._deferred.get(task.task_id)
        if job is not None:
            return job
        try:
            return self._start(task, context, after=after)
        except Exception as exc:
            self._jobs.pop(task.task_id, None)
            log.error("task %s could not start in the scheduler", task.task_id, exc_info=exc)
            job = Job(task, trace_context(context), time.time())
            result = failed_record(task, job.trace_id, exc, 0.0)
            self._spawn_write(result)
            job.accepted.set_result(None)
            job.done.set_result(result)
            return job

    async def withdraw(self) -> int:
        """Ends every `run` call still waiting, with a cancellation (the tasks themselves go
        on, and stay accepted in Redis): the pool calls it before it stops the scheduler,
        which would otherwise leave Ray printing a line per call. Returns how many."""
        return await withdraw_calls(self._callers)

    async def boot(self) -> int:
        """Takes up every task this pool accepted and has not finished (its backlog in Redis):
        after a restart they are read back in their turn, the interactive ones first, and run
        from their checkpoints. Runs once, when the actor starts. Returns how many wait."""
        if self._booted:
            return 0
        self._booted = True
        try:
            await self._load_agents()
            await self._load_live()
            await self._load_drain()
        except (RedisError, OSError) as exc:  # it runs on its first configuration meanwhile
            log.error("could not read the live configuration or a drain back (%s)", exc)
        finally:
            self._loaded.set()
        waiting = await self._count_backlog()
        self._durable["recovered"] += waiting
        return waiting

    @ray.method(enable_task_events=False)  # see `Scheduler.run`
    async def enqueue(
        self, tasks: list[AgentTask], traceparents: list[str], *, reply: bool = False
    ) -> list[dict[str, Any]]:
        """Accepts tasks without waiting for them to run (a detached submission): returns, per
        task, `accepted` or the final status it already has (a rejection, say). Their results
        land in Redis. With `reply` (the relay's calls), each record is also sent to the
        relay when its task ends, and one that exists already comes back as `record`."""
        await self._loaded.wait()
        tasks = await self._with_agents(tasks)
        batch: list[int] = []
        for i, t in enumerate(tasks):
            if (
                t.task_id not in self._jobs
                and t.task_id not in self._deferred
                and self._admits_in_batch(t, len(batch), reply=reply)
            ):
                batch.append(i)
        quick = set(batch)
        jobs = {i: self._job_for(t, traceparents[i]) for i, t in enumerate(tasks) if i not in quick}
        for joined in jobs.values():
            joined.reply = joined.reply or reply
        try:
            records = await self._admit_batch([tasks[i] for i in batch], [traceparents[i] for i in batch], reply)
        except Exception as exc:  # Redis refused the step, say: each task takes a job's own path
            log.warning("admitting %d tasks in one step failed (%s); admitting them one by one", len(batch), exc)
            jobs.update({i: self._job_for(tasks[i], traceparents[i]) for i in batch})
            for i in batch:
                jobs[i].reply = jobs[i].reply or reply
            records = [None] * len(batch)
        ended = dict(zip(batch, records, strict=True))
        await asyncio.gather(*(asyncio.shield(j.accepted) for j in jobs.values()))
        out: list[dict[str, Any]] = []
        for i, task in enumerate(tasks):
            record = ended.get(i)
            job = jobs.get(i)
            if job is not None and job.done.done() and not job.done.cancelled():
                record = job.done.result()
            reply_to: dict[str, Any] = {"task_id": task.task_id, "status": "accepted"}
            if record is not None:
                reply_to["status"] = record.status
                if reply:
                    reply_to["record"] = record
            out.append(reply_to)
        return out

    async def _await_decision(self, job: Job, paused: Paused) -> None:
        """Holds a paused job (no slot) until its approval comes, it is cancelled, or its
        deadline passes; the decision goes to Redis for the run that resumes it."""
        task = job.task
        job.state, job.paused = "paused", paused
        job.decision = asyncio.get_running_loop().create_future()
        if job.cancel_reason is None:
            with contextlib.suppress(RedisError, OSError):
                # The reviewer sees the arguments, less anything shaped like a credential.
                shown = paused.model_copy(update={"arguments": redact(paused.arguments, pii=False)})
                await self._approvals.request(shown, job.trace_id)
            try:
                async with asyncio.timeout(max(0.0, paused.deadline_unix - time.time())):
                    await job.decision
            except TimeoutError:
                expired = ApprovalDecision(tool_use_ids=paused.tool_use_ids, approved=None, decided_unix=time.time())
                with contextlib.suppress(RedisError, OSError):
                    await self._approvals.decide(task.tenant, task.task_id, expired)
        job.decision = None

    async def approve(self, task_id: str, approved: bool, note: str = "") -> dict[str, Any]:
        """Decides on a paused task's tool calls; the task resumes at once (the tools run, or
        get a denial as their result). Returns `{"task_id", "status"}` with status `decided`,
        or `not_awaiting_approval` if the task is not paused here."""
        job = self._jobs.get(task_id)
        if job is None or job.paused is None or job.decision is None or job.decision.done():
            return {"task_id": task_id, "status": "not_awaiting_approval"}
        decision = ApprovalDecision(
            tool_use_ids=job.paused.tool_use_ids, approved=approved, note=note[:2000], decided_unix=time.time()
        )
        await self._approvals.decide(job.task.tenant, task_id, decision)
        decided = events.ApprovalDecided(approved=approved, note=note)
        self._store.post(job.task.tenant, decided, task_id=task_id, trace_id=job.trace_id)
        if not job.decision.done():
            job.decision.set_result(decision)
        return {"task_id": task_id, "status": "decided"}

    async def pending_approvals(self, tenant: str) -> list[dict[str, Any]]:
        return await self._approvals.pending(tenant)

    async def cancel(
        self, task_id: str, reason: str = "cancelled by request", interrupted: OnBusy | None = None
    ) -> AgentResult | None:
        """Stops a queued, paused or running task; returns its final record (`cancelled`,
        or how it ended if it ended first). None if this pool has no such task running.
        `interrupted`: a later task of its session stops it (what its session keeps of its
        turn depends on how, `OnBusy`)."""
        job = self._jobs.get(task_id)
        if job is None:
            return await self._cancel_backlogged(task_id, reason)
        job.cancel_reason, job.interrupted = reason, interrupted
        task = job.task
        # For a run that starts or resumes later (or on another worker): it ends at once.
        with contextlib.suppress(RedisError, OSError):
            await self._store.mark_cancelled(task.tenant, task_id, reason)
        if job.state == "waiting":
            self._cancel_waiting(job)
        elif job.state == "queued" and not job.resumed and self._core.remove(job.ticket):
            if not job.slot.done():
                job.slot.set_exception(CancelledInQueue())
        elif job.state == "running" and job.worker is not None:
            self._fleet.handles[job.worker].cancel.remote(task_id, reason, interrupted)
        elif job.state == "paused" and job.decision is not None and not job.decision.done():
            job.decision.set_result(None)  # it resumes only to end as cancelled, with its work so far
        return await asyncio.shield(job.done)

    async def _cancel_backlogged(self, task_id: str, reason: str) -> AgentResult | None:
        """Cancels a task that waits in the Redis backlog (with or without a caller)."""
        job = self._deferred.get(task_id)
        if job is not None:
            job.cancel_reason = reason
            if job.pulled is not None and not job.pulled.done():
                job.pulled.set_exception(CancelledInQueue())
            return await asyncio.shield(job.done)
        job = await self._find_backlogged(task_id)
        if job is None or task_id in self._jobs:  # not here, or read into the queue meanwhile
            return None if job is None else await self.cancel(task_id, reason)
        job.cancel_reason = reason
        result = await self._cancelled(job)
        self._left_backlog(job.task)
        return result

    def _awaiting(self) -> dict[str, list[str]]:
        """Paused tasks waiting for a human, by tenant."""
        out: dict[str, list[str]] = {}
        for job in self._jobs.values():
            if job.state == "paused" and job.decision is not None:
                out.setdefault(job.task.tenant, []).append(job.task.task_id)
        return out

    async def _redis_backlog(self) -> Counter[str]:
        """Writes waiting for Redis here and in every worker (they hold most final records)."""
        total: Counter[str] = Counter(self._store.backlog)
        calls = [h.backlog.remote() for i, h in enumerate(self._fleet.handles) if self._fleet.slots.open[i]]
        try:
            for backlog in await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), _BACKLOG_WAIT_S):
                if isinstance(backlog, dict):  # a worker restarting is left out
                    total.update(backlog)
        except TimeoutError:
            pass
        return total
