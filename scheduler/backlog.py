"""The scheduler's window on the Redis backlog (a mixin of `Scheduler`, kept apart for size).

Every accepted task is in the backlog in Redis (`cluster.journal`). Interactive work (a
deadline, or `sheddable`) is also queued in memory at once: it is short-lived by its
deadline, and admission forecasts its wait from the queue. Batch work (no deadline) is
queued in memory only while the in-memory queue holds fewer than `PoolConfig.queue_window`
tasks and none of its tenant's class waits in Redis ahead of it; otherwise it waits in Redis
only, and the scheduler keeps a count per tenant and class. Whenever the queue falls below
half the window, `_pull` reads on in the backlog sets, tenants with the least service
received first, so the scheduler's memory does not grow with the backlog.

A `run` call whose task waits in Redis keeps its `Job` in `_deferred` until the task is read
(its life then goes on); an `enqueue`d task keeps nothing in memory but its count.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING

from agentpool.cluster.budgets import limits_of
from agentpool.cluster.connection import REDIS_DOWN, PendingAdmission
from agentpool.models import PRIORITIES, AgentResult, AgentTask
from agentpool.protocol import Admitted, traceparent
from agentpool.scheduler.admission import Admission
from agentpool.scheduler.jobs import Job, trace_context
from agentpool.scheduler.records import failed_record
from agentpool.scheduler.shedding import interactive
from agentpool.telemetry import trace_id_of

if TYPE_CHECKING:
    from agentpool.cluster.store import ResultStore
    from agentpool.config import PoolConfig
    from agentpool.errors import AgentPoolError
    from agentpool.scheduler.core import SchedulerCore

log = logging.getLogger("agentpool.scheduler")

#: A backlog set is read at most this many entries at a time.
_PULL_MAX = 1000
#: How long `_pull` waits before reading again after Redis failed it.
_PULL_RETRY_S = 0.5

Key = tuple[str, str]


class BacklogWindow:
    """Deferring batch work to the Redis backlog, and reading it back as the queue drains."""

    config: PoolConfig
    _store: ResultStore
    _core: SchedulerCore[Job]
    _jobs: dict[str, Job]
    #: Tasks waiting in Redis only (not in memory), per (tenant, priority); their total is
    #: the core's `outside`, which counts against the backlog's bound.
    _waiting: Counter[Key]
    #: Bumped whenever a task is deferred: a read that ended before it cannot zero its count.
    _deferrals: Counter[Key]
    _cursors: dict[Key, str]
    _deferred: dict[str, Job]
    _puller: asyncio.Task[None] | None
    #: Tasks whose jobs ended while a read of the backlog was in flight; None when none is.
    _ended_in_read: set[str] | None
    _admission: Admission
    _agent_refusals: dict[str, AgentPoolError]

    if TYPE_CHECKING:  # Scheduler's; declared here for the type checker only

        def _start(
            self,
            task: AgentTask,
            traceparent: str,
            *,
            adopted: bool = False,
            admitted_unix: float = 0.0,
            from_backlog: bool = False,
        ) -> Job: ...

        _pump: Callable[[], None]

        def _note_tenant(self, tenant: str) -> None: ...

        def _spawn_write(self, result: AgentResult) -> None: ...

    def _init_backlog(self) -> None:
        self._waiting = Counter()
        self._deferrals = Counter()
        self._cursors = {}
        self._deferred = {}
        self._puller = None
        self._ended_in_read = None

    def _set_waiting(self, key: Key, count: int) -> None:
        count = max(0, count)
        self._core.outside += count - self._waiting[key]
        if count:
            self._waiting[key] = count
        else:
            self._waiting.pop(key, None)

    def _backlog_depth(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for (tenant, priority), count in self._waiting.items():
            out.setdefault(tenant, {})[priority] = count
        return out

    def _leave_in_redis(self, task: AgentTask, arrival: int, *, known: bool, detached: bool, placing: int = 0) -> bool:
        """Whether a task just accepted (arrival number `arrival`) waits in Redis only, and if
        so counts it: batch work when the queue's window is full or its tenant's class
        already waits there; a task accepted before (`known`, submitted again without a
        caller: a relay that restarted, say) always, as it is there already.

        Never a task a read of the backlog has gone past (the read skipped it as in memory,
        while it was being admitted): nothing would read it again. Nor a task with no
        arrival number (Redis is away: its admission waits in the outbox). `placing`: tasks
        on their way into the queue that it does not count yet. While the pool drains,
        detached batch work always waits in Redis."""
        key = (task.tenant, task.priority)
        if interactive(task.priority, task.deadline_s) or arrival <= max(0.0, float(self._cursors.get(key, "-inf"))):
            return False
        if self._core.draining is not None and detached and not known:  # for whoever takes work next
            self._set_waiting(key, self._waiting[key] + 1)
        elif known:
            if not detached:
                return False
            if not self._waiting[key]:  # counted already or not: a read happens, and corrects it
                self._set_waiting(key, 1)
        elif not self._waiting[key] and len(self._core.queue) + placing < self.config.queue_window:
            return False
        else:
            self._set_waiting(key, self._waiting[key] + 1)
        self._deferrals[key] += 1
        self._kick_pull()
        return True

    def _defer(self, job: Job, arrival: int) -> bool:
        """`_leave_in_redis` for a job being admitted. A deferred job leaves `_jobs`: with
        callers waiting it is kept in `_deferred` until it is read; without, nothing of it
        stays in memory but its count. A session's task is never deferred: it keeps its
        place in its session's line in memory (one of a session runs at a time)."""
        task = job.task
        if task.session_id is not None:  # it holds its place in its session's line, here
            return False
        # No caller waits in memory (a relay's task too: its record reaches the relay from
        # its admission entry, once the task is read back and ends).
        if not self._leave_in_redis(task, arrival, known=job.adopted, detached=not job.callers):
            return False
        if self._jobs.get(task.task_id) is job:
            del self._jobs[task.task_id]
        if job.callers:
            job.pulled = asyncio.get_running_loop().create_future()
            self._deferred[task.task_id] = job
        return True

    def _admits_in_batch(self, task: AgentTask, ahead: int, *, reply: bool) -> bool:
        """Whether `enqueue` may admit the task with others in one step (`_admit_batch`):
        batch work of a tenant with no budget and no injection screen, that passes the
        static checks, while the backlog has room (for it and the `ahead` tasks of the same
        batch before it), and not a session's (it takes its place in its session's line as
        it arrives), nor the relay's (`reply`) while the pool drains (its callers wait on
        refs: the drain refuses it, where detached batch work waits in Redis for the next
        pool). Anything else takes a job's own path
        (which writes its rejection, its findings, its eviction)."""
        policy = self.config.policy_for(task.tenant)
        return (
            policy is not None
            and not (reply and self._core.draining is not None)
            and task.session_id is None
            and (task.agent is None or task.agent_version is not None)
            and task.task_id not in self._agent_refusals
            and not interactive(task.priority, task.deadline_s)
            and policy.guardrails.injection == "off"
            and not limits_of(policy)
            and self._admission.check(task) is None
            and self._core.waiting + ahead < self.config.max_queued
        )

    async def _admit_batch(self, tasks: list[AgentTask], contexts: list[str], reply: bool) -> list[AgentResult | None]:
        """Admits batch work in one round trip to Redis, with no job for the tasks that wait
        there: per task, the record it has already, or None (accepted)."""
        now = time.time()
        contexts = [trace_context(c) for c in contexts]
        admitted = [
            Admitted(task=t, trace_id=trace_id_of(c), traceparent=c, admitted_unix=now, reply=reply)
            for t, c in zip(tasks, contexts, strict=True)
        ]
        pending = [PendingAdmission(a.task, a.model_dump_json()) for a in admitted]
        admissions = await self._store.admit_many(pending)
        out: list[AgentResult | None] = []
        placing = 0  # jobs started here are queued when their lives first run, after this loop
        for task, context, admission in zip(tasks, contexts, admissions, strict=True):
            out.append(admission.record)
            if admission.record is not None:
                continue
            self._note_tenant(task.tenant)
            joined = self._jobs.get(task.task_id) or self._deferred.get(task.task_id)
            if joined is not None:  # submitted again meanwhile: one job
                joined.reply = joined.reply or reply
            elif not self._leave_in_redis(
                task, admission.arrival, known=admission.known, detached=True, placing=placing
            ):
                try:
                    job = self._start(task, context, adopted=admission.known, admitted_unix=now, from_backlog=True)
                    job.fresh = not admission.known
                except Exception as exc:  # a bug of ours: the task ends `failed`, saying why
                    log.error("task %s could not start in the scheduler", task.task_id, exc_info=exc)
                    failed = failed_record(task, trace_id_of(context), exc, 0.0)
                    self._spawn_write(failed)
                    out[-1] = failed
                    continue
                job.reply = reply
                placing += 1
        return out

    async def _wait_in_backlog(self, job: Job) -> bool:
        """Holds a deferred job whose callers wait until its task is read from the backlog
        (then it is queued). Returns False if it was cancelled there."""
        assert job.pulled is not None
        try:
            await job.pulled
        except Exception:  # CancelledInQueue
            self._deferred.pop(job.task.task_id, None)
            self._left_backlog(job.task)
            return False
        finally:
            job.pulled = None
        return True

    def _kick_pull(self) -> None:
        if self._core.draining is not None:  # it stays in Redis for the next pool
            return
        if self._core.outside and (self._puller is None or self._puller.done()):
            if len(self._core.queue) < self.config.queue_window // 2 + 1:
                self._puller = asyncio.get_running_loop().create_task(self._pull())

    def _pull_order(self, room: int) -> list[tuple[Key, int]]:
        """Which backlog sets to read, and how much of each: every waiting tenant's most
        important waiting class, the tenants with the least service received first."""
        first: dict[str, str] = {}
        for tenant, priority in self._waiting:
            if tenant not in first or PRIORITIES.index(priority) < PRIORITIES.index(first[tenant]):
                first[tenant] = priority
        counters = self._core.queue.counters
        tenants = sorted(first, key=lambda t: counters.get(t, 0.0))[: max(1, room)]
        share = max(1, room // max(1, len(tenants)))
        return [((t, first[t]), min(_PULL_MAX, share, self._waiting[(t, first[t])])) for t in tenants]

    async def _pull(self) -> None:
        """Reads tasks from the backlog into the queue until it holds half its window again
        or nothing waits in Redis."""
        while self._core.outside and len(self._core.queue) < self.config.queue_window // 2 + 1:
            order = self._pull_order(self.config.queue_window - len(self._core.queue))
            deferrals = {key: self._deferrals[key] for key, _ in order}
            reads = [(t, p, self._cursors.get((t, p), "-inf"), n) for (t, p), n in order]
            self._ended_in_read = set()
            try:
                pulled = await self._store.pull(reads)
            except REDIS_DOWN as exc:
                log.warning("could not read the backlog (%s); trying again", exc)
                await asyncio.sleep(_PULL_RETRY_S)
                continue
            finally:
                ended, self._ended_in_read = self._ended_in_read, None
            for (key, _), result in zip(order, pulled, strict=True):
                self._cursors[key] = result.cursor
                fresh = sum(self._take(task_id, entry, ended) for task_id, _, entry in result.entries)
                self._set_waiting(key, self._waiting[key] - fresh)
                if not result.left and deferrals[key] == self._deferrals[key]:
                    self._set_waiting(key, 0)  # read to the end: nothing of this class waits there
            self._pump()

    def _note_ended(self, task_id: str) -> None:
        """A job ended. If a read of the backlog is in flight, its answer may hold the task
        still (read while the job ran): it must not be taken again, nor counted as read."""
        if self._ended_in_read is not None:
            self._ended_in_read.add(task_id)

    def _take(self, task_id: str, entry: str, ended: set[str]) -> bool:
        """Queues a task read from the backlog; False if it is in memory already, or its job
        ended while the read was in flight (its record is written)."""
        if task_id in self._jobs or task_id in ended:
            return False
        job = self._deferred.pop(task_id, None)
        if job is not None:
            self._jobs[task_id] = job
            if job.pulled is not None and not job.pulled.done():
                job.pulled.set_result(None)
            return True
        try:
            admitted = Admitted.model_validate_json(entry)
        except ValueError:
            log.error("task %s: its admission in the backlog cannot be read", task_id)
            return True
        task = admitted.task
        context = admitted.traceparent or traceparent(admitted.trace_id)
        # Interactive work is in memory from admission to end: read from Redis, it was
        # accepted by a scheduler that is gone, and goes first (adopted).
        adopted = interactive(task.priority, task.deadline_s)
        try:
            job = self._start(task, context, adopted=adopted, admitted_unix=admitted.admitted_unix, from_backlog=True)
            job.reply = admitted.reply
        except Exception:  # one task that cannot start keeps no other from being read
            log.exception("task %s could not be taken from the backlog", task_id)
        return True

    async def _count_backlog(self) -> int:
        """At boot: how many tasks wait in each backlog set (all are read from the start)."""
        total = 0
        async for tenant, priority, size in self._store.backlog_sizes():
            self._set_waiting((tenant, priority), size)
            total += size
        self._kick_pull()
        return total

    async def _find_backlogged(self, task_id: str) -> Job | None:
        """A task waiting in Redis only (nothing of it in memory), looked for among the
        tenants that have such tasks: a job made from its admission, or None."""
        found = await self._store.find_admitted(sorted({tenant for tenant, _ in self._waiting}), task_id)
        if found is None:
            return None
        admitted = Admitted.model_validate_json(found[1])
        job = Job(admitted.task, admitted.traceparent or traceparent(admitted.trace_id), admitted.admitted_unix)
        job.ticket = self._core.ticket(job, admitted.task)
        return job

    def _left_backlog(self, task: AgentTask) -> None:
        """Counts out a task that ended while it waited in Redis (cancelled there)."""
        key = (task.tenant, task.priority)
        self._set_waiting(key, self._waiting[key] - 1)
