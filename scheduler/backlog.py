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
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING

from agentpool.cluster.connection import REDIS_DOWN
from agentpool.models import PRIORITIES, AgentTask
from agentpool.protocol import Admitted, traceparent
from agentpool.scheduler.jobs import Job
from agentpool.scheduler.shedding import interactive

if TYPE_CHECKING:
    from agentpool.cluster.store import ResultStore
    from agentpool.config import PoolConfig
    from agentpool.scheduler.fair import FairQueue

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
    _queue: FairQueue[Job]
    _jobs: dict[str, Job]
    #: Tasks waiting in Redis only (not in memory), per (tenant, priority).
    _waiting: Counter[Key]
    _waiting_total: int
    #: Bumped whenever a task is deferred: a read that ended before it cannot zero its count.
    _deferrals: Counter[Key]
    _cursors: dict[Key, str]
    _deferred: dict[str, Job]
    _puller: asyncio.Task[None] | None

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

    def _init_backlog(self) -> None:
        self._waiting = Counter()
        self._waiting_total = 0
        self._deferrals = Counter()
        self._cursors = {}
        self._deferred = {}
        self._puller = None

    def _set_waiting(self, key: Key, count: int) -> None:
        count = max(0, count)
        self._waiting_total += count - self._waiting[key]
        if count:
            self._waiting[key] = count
        else:
            self._waiting.pop(key, None)

    def _backlog_depth(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for (tenant, priority), count in self._waiting.items():
            out.setdefault(tenant, {})[priority] = count
        return out

    def _defer(self, job: Job, arrival: int) -> bool:
        """Leaves a task just accepted (arrival number `arrival`) to wait in Redis only, if it
        is batch work and the queue's window is full or its tenant's class already waits
        there. A deferred job leaves `_jobs`: with callers waiting it is kept in `_deferred`
        until it is read; without, nothing of it stays in memory but its count.

        Never a task a read of the backlog has gone past (it skipped the task as in memory,
        while this job was being admitted): nothing would read it again."""
        task = job.task
        key = (task.tenant, task.priority)
        cursor = float(self._cursors.get(key, "-inf"))
        if job.adopted and not job.callers and not interactive(task.priority, task.deadline_s) and arrival > cursor:
            # Submitted again (a relay that restarted, say) while it waits in the backlog, where
            # no read has passed it yet: it is read there in its turn, counted already or not.
            if not self._waiting[key]:
                self._set_waiting(key, 1)  # so that a read happens; a read to the end corrects it
            self._deferrals[key] += 1
            if self._jobs.get(task.task_id) is job:
                del self._jobs[task.task_id]
            self._kick_pull()
            return True
        if (
            interactive(task.priority, task.deadline_s)
            or arrival <= 0  # not in the backlog yet (Redis is away): it is queued in memory
            or arrival <= cursor  # a read went past it already
            or (not self._waiting[key] and len(self._queue) < self.config.queue_window)
        ):
            return False
        self._set_waiting(key, self._waiting[key] + 1)
        self._deferrals[key] += 1
        if self._jobs.get(task.task_id) is job:
            del self._jobs[task.task_id]
        if job.callers:
            job.pulled = asyncio.get_running_loop().create_future()
            self._deferred[task.task_id] = job
        self._kick_pull()
        return True

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
        if self._waiting_total and (self._puller is None or self._puller.done()):
            if len(self._queue) < self.config.queue_window // 2 + 1:
                self._puller = asyncio.get_running_loop().create_task(self._pull())

    def _pull_order(self, room: int) -> list[tuple[Key, int]]:
        """Which backlog sets to read, and how much of each: every waiting tenant's most
        important waiting class, the tenants with the least service received first."""
        first: dict[str, str] = {}
        for tenant, priority in self._waiting:
            if tenant not in first or PRIORITIES.index(priority) < PRIORITIES.index(first[tenant]):
                first[tenant] = priority
        counters = self._queue.counters
        tenants = sorted(first, key=lambda t: counters.get(t, 0.0))[: max(1, room)]
        share = max(1, room // max(1, len(tenants)))
        return [((t, first[t]), min(_PULL_MAX, share, self._waiting[(t, first[t])])) for t in tenants]

    async def _pull(self) -> None:
        """Reads tasks from the backlog into the queue until it holds half its window again
        or nothing waits in Redis."""
        while self._waiting_total and len(self._queue) < self.config.queue_window // 2 + 1:
            order = self._pull_order(self.config.queue_window - len(self._queue))
            deferrals = {key: self._deferrals[key] for key, _ in order}
            reads = [(t, p, self._cursors.get((t, p), "-inf"), n) for (t, p), n in order]
            try:
                pulled = await self._store.pull(reads)
            except REDIS_DOWN as exc:
                log.warning("could not read the backlog (%s); trying again", exc)
                await asyncio.sleep(_PULL_RETRY_S)
                continue
            for (key, _), result in zip(order, pulled, strict=True):
                self._cursors[key] = result.cursor
                fresh = sum(self._take(task_id, entry) for task_id, _, entry in result.entries)
                self._set_waiting(key, self._waiting[key] - fresh)
                if not result.left and deferrals[key] == self._deferrals[key]:
                    self._set_waiting(key, 0)  # read to the end: nothing of this class waits there
            self._pump()

    def _take(self, task_id: str, entry: str) -> bool:
        """Queues a task read from the backlog; False if it is in memory already."""
        if task_id in self._jobs:
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
        return Job(admitted.task, admitted.traceparent or traceparent(admitted.trace_id), admitted.admitted_unix)

    def _left_backlog(self, task: AgentTask) -> None:
        """Counts out a task that ended while it waited in Redis (cancelled there)."""
        key = (task.tenant, task.priority)
        self._set_waiting(key, self._waiting[key] - 1)
