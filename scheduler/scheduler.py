"""The scheduler actor: admits, queues and dispatches tasks, and returns their results.

It returns `AgentResult` values, never refs: the client calls `run.remote`, so the client
owns each task's ref, and the scheduler awaits the worker itself (see DESIGN.md).

Admission, in order: static checks (tenant, tools, models), the tenant's prompt-injection
screen and daily budgets (Redis), then the pure core's rules from live state
(`SchedulerCore`, in core.py): overload level, the predicted wait at the tenant's fair share
against the task's deadline, and the queue bound. The core also queues (weighted fair
queueing across tenants), dispatches and drops tasks that waited longer than they may; this
actor is its I/O shell, carrying out the decisions it returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import os
import time
import warnings
from collections import Counter
from typing import Any

import ray
from redis.exceptions import RedisError

from agentpool import events, heap
from agentpool.background import Background
from agentpool.cluster.approvals import Approvals
from agentpool.cluster.budgets import BudgetLedger
from agentpool.cluster.store import ResultStore
from agentpool.cluster.telemetry import Telemetered
from agentpool.config import PoolConfig
from agentpool.errors import AgentPoolError, RetryLater, WorkerFailed
from agentpool.models import AgentResult, AgentTask
from agentpool.protocol import Admitted, Dispatch, Paused, RunFailed, WorkerSpawn, unpack
from agentpool.scheduler.admission import Admission, screen_task
from agentpool.scheduler.agent_control import AgentControl
from agentpool.scheduler.alerts import AlertMonitor
from agentpool.scheduler.backlog import BacklogWindow
from agentpool.scheduler.calls import WorkerCalls
from agentpool.scheduler.capacity import LimiterBacklog
from agentpool.scheduler.control import CancelledInQueue, JobControl
from agentpool.scheduler.core import Drop, Reject, SchedulerCore
from agentpool.scheduler.drain import DrainControl
from agentpool.scheduler.fleet import WorkerFleet
from agentpool.scheduler.jobs import Job, trace_context
from agentpool.scheduler.live import LiveControl
from agentpool.scheduler.lookup import TaskLookup
from agentpool.scheduler.observe import TaskTelemetry
from agentpool.scheduler.records import Records
from agentpool.scheduler.session_gate import SessionGate
from agentpool.scheduler.shedding import interactive
from agentpool.scheduler.status import StatusView
from agentpool.vocabulary import TaskStatus

#: How often queued tasks are checked against their deadlines and the queue for a standing wait.
_TICK_S = 0.25
#: Tenants whose budgets `status()` reports besides the configured ones.
_MAX_SEEN_TENANTS = 1000

log = logging.getLogger("agentpool.scheduler")


@ray.remote
class Scheduler(
    AgentControl,
    JobControl,
    BacklogWindow,
    DrainControl,
    LiveControl,
    Records,
    SessionGate,
    StatusView,
    TaskLookup,
    Telemetered,
):
    """Named async actor; one per pool."""

    def __init__(
        self,
        config: PoolConfig,
        *,
        redis_url: str,
        worker_names: list[str],
        namespace: str,
        worker_spawn: WorkerSpawn | None = None,
        tool_names: list[str],
        limiter_name: str,
        board_name: str | None = None,
        extra_info: dict[str, Any] | None = None,
    ) -> None:
        self._setup_telemetry("scheduler")
        self.config = config
        self.redis_url = redis_url
        # Handles by name, so constructor arguments are plain data a restart can always reuse.
        self._fleet = WorkerFleet(config, worker_names, worker_spawn, namespace, on_capacity=self._pump)
        self._calls = WorkerCalls(lambda worker: self._fleet.handles[worker])
        self._limiter = ray.get_actor(limiter_name, namespace=namespace)
        self._board = ray.get_actor(board_name, namespace=namespace) if board_name else None
        self._admission = Admission(config, set(tool_names))
        self._core: SchedulerCore[Job] = SchedulerCore(config, self._fleet.slots)
        self._telemetry = TaskTelemetry(
            config.name,
            lambda: {t: sum(d.values()) for t, d in self._core.queue.depth().items()},
            lambda: dict(self._core.running),
        )
        self._jobs: dict[str, Job] = {}
        self._init_backlog()
        self._init_sessions()
        #: Records on their way to the relay (`_reply`), and its handle once found.
        self._replies: list[AgentResult] = []
        self._relay: Any = None
        self._namespace = namespace
        self._lives = Background()
        self._writes = Background()
        #: The `run` calls waiting for their task's record (the ones `withdraw` ends).
        self._callers: set[asyncio.Task[Any]] = set()
        self._extra_info = dict(extra_info or {})
        self._store = ResultStore.for_pool(redis_url, config, current=lambda: self.config)
        self._ledger = BudgetLedger(
            lambda: self._store.redis, self._store.keys, reservation_ttl_s=config.lease_expiry_s
        )
        self._clock = time.monotonic
        self._seen: dict[str, None] = {}
        self._counts: Counter[str] = Counter()
        self._durable: Counter[str] = Counter()
        self._shed: Counter[str] = Counter()
        self._ends: dict[str, Counter[TaskStatus]] = {}
        self._alerts = AlertMonitor(config.alerts)
        self._ticker: asyncio.Task[None] | None = None
        self._loop_lag_s = 0.0
        self._approvals = Approvals(self._store, config.checkpoint_ttl_s)
        self._init_agents()
        self._init_drain()
        self._init_live()
        self._booted = False
        self._loaded = asyncio.Event()
        # Take up what this pool accepted before (a restart): a call to ourselves, which runs
        # as soon as this constructor returns.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self._boot = ray.get_runtime_context().current_actor.boot.remote()
        heap.settle()

    def info(self) -> dict[str, Any]:
        """What `AgentPool.connect` needs to attach to this pool."""
        return {"config": self.config.model_dump(mode="json"), "redis_url": self.redis_url, **self._extra_info}

    @ray.method(enable_task_events=False)
    async def run(self, task: bytes | AgentTask, traceparent: str, after: tuple[str, ...] = ()) -> AgentResult:
        """Admits and runs one task (an `AgentTask`, `protocol.pack`ed: Ray's own pickling
        of it costs more; a client of the release before sends it as an object, which is
        taken too); always returns its final record.

        Like every call the pool makes per task, per dispatch or per tool call (the relay's,
        the workers', the tool executors', the limiter's), it reports no task events to Ray
        (`enable_task_events=False`): they would fill Ray's store of task events (100,000
        by default) with the pool's own traffic, and they cost a bare echo 5-20% of its CPU
        per call. The pool's own events, metrics and traces cover these calls.

        The task_id is the idempotency key: a task already finished returns its record, and
        one submitted again while it runs shares the first run. Once accepted, a task is the
        scheduler's: if this call is cancelled, or its caller dies, the task still runs.
        `traceparent` is the W3C trace context the task's trace continues from; `after`,
        the tasks of its session sent before it in the same call of the client (it takes its
        place in the session's line after theirs).
        """
        await self._loaded.wait()
        caller = asyncio.current_task()
        if caller is not None:
            self._callers.add(caller)
        submitted = task if isinstance(task, AgentTask) else unpack(task, AgentTask)
        if self._names_agent(submitted):
            (submitted,) = await self._with_agents([submitted])
        job = self._job_for(submitted, traceparent, after)
        job.callers += 1
        try:
            return await asyncio.shield(job.done)
        finally:
            if caller is not None:
                self._callers.discard(caller)

    def _start(
        self,
        task: AgentTask,
        context: str,
        *,
        adopted: bool = False,
        admitted_unix: float = 0.0,
        from_backlog: bool = False,
        after: tuple[str, ...] = (),
    ) -> Job:
        # Registered before the first await, so a duplicate arriving meanwhile joins this job.
        job = Job(task, trace_context(context), admitted_unix or time.time())
        job.ticket = self._core.ticket(job, task)
        job.adopted, job.from_backlog, job.after = adopted, from_backlog, after
        self._jobs[task.task_id] = job
        self._arrive(job)
        try:
            self._telemetry.begin(job)
        except Exception:  # telemetry is never a reason for a task not to run
            log.exception("telemetry failed as task %s began", task.task_id)
        self._lives.spawn(self._life(job), then=functools.partial(self._ended, job=job))
        return job

    async def _life(self, job: Job) -> AgentResult | None:
        """Admits, queues and runs the job; its final record, or None when the task was left
        to wait in the Redis backlog with no caller waiting (it is read back in its turn)."""
        task, trace_id = job.task, job.trace_id
        try:
            if not job.from_backlog:
                arrival = 0  # adopted at boot: in memory, whatever the backlog holds
                refusal = None if job.adopted else self._refusal(job)
                if refusal is not None:  # refused at once: never in the backlog
                    return await self._reject(task, trace_id, refusal, job.admitted_unix)
                if not job.adopted:
                    entry = Admitted(
                        task=task,
                        trace_id=trace_id,
                        traceparent=job.traceparent,
                        admitted_unix=job.admitted_unix,
                        reply=job.reply,
                    ).model_dump_json()
                    admission = await self._store.admit(task, entry)
                    if admission.record is not None:
                        return admission.record
                    job.adopted, arrival = admission.known, admission.arrival
                    job.fresh = not admission.known
                rejection = None if job.adopted else await self._admission_check(job)
                if rejection is not None:
                    return await self._reject(task, trace_id, rejection, job.admitted_unix)
                if self._defer(job, arrival):
                    if not job.callers:
                        self._telemetry.backlogged(job)
                        return None
                    if not await self._wait_in_backlog(job):
                        return await self._cancelled(job)
            ended = await self._session_turn(job)
            if ended is not None:  # rejected (its session is busy), or cancelled as it waited
                return ended
            self._enqueue(job)
            return await self._through(job)
        except Exception as exc:  # ray.get must never raise for a task: report it as a result
            self._abandon(job)
            return await self._fail(task, trace_id, exc, 0.0)

    def _abandon(self, job: Job) -> None:
        """Takes a job an error stopped out of the queue, and gives back a slot it holds, so
        that nothing of it is left to be dispatched or counted as running."""
        self._core.finish(job.ticket)
        if not job.slot.done():
            job.slot.cancel()
        self._pump()

    def _refusal(self, job: Job) -> AgentPoolError | None:
        """What refuses an arrival before it is recorded: the static checks, and for
        interactive work the core's rules (`SchedulerCore.refusal`). `_admission_check`
        decides again once it is recorded."""
        task = job.task
        self._start_ticker()
        self._note_tenant(task.tenant)
        rejection = self._agent_refusal(task) or self._admission.check(task)
        if rejection is None and interactive(task.priority, task.deadline_s):
            refused = self._core.refusal(job.ticket, self._clock())
            rejection = refused.error(task.tenant) if refused is not None else None
        return rejection

    async def _admission_check(self, job: Job) -> AgentPoolError | None:
        """The rest of admission, once the arrival is recorded (it passed `_refusal`): the
        tenant's injection screen and budgets, then the core's rules again, committing."""
        task = job.task
        rejection: AgentPoolError | None = None
        policy = self.config.policy_for(task.tenant)
        if policy is not None and policy.guardrails.injection != "off":
            job.findings, rejection = screen_task(task, policy.guardrails)
            if rejection is not None:
                self._report_findings(job, "rejected")
        if rejection is None and policy is not None:
            first_call = math.ceil((len(task.prompt) + len(task.system or "")) / self.config.input_chars_per_token)
            rejection = await self._ledger.check(task.tenant, policy, first_call + task.max_tokens)
        if rejection is not None:
            return rejection
        detached_batch = job.detached and not interactive(task.priority, task.deadline_s)
        if self._core.draining is not None and detached_batch and self._core.waiting < self.config.max_queued:
            return None  # it waits in the Redis backlog for whoever takes work next
        # No await between the core's decision and the enqueue: concurrent arrivals must
        # not all pass the check before any of them is counted.
        verdict = self._core.admit(job.ticket, self._clock())
        if isinstance(verdict, Reject):
            return verdict.error(task.tenant)
        for evicted in verdict.evicted:
            self._drop(evicted)
        return None

    def _report_findings(self, job: Job, action: str) -> None:
        for source, rules in job.findings.items():
            found = events.InjectionDetected(source=source, rules=rules, action=action)
            self._store.post(job.task.tenant, found, task_id=job.task.task_id, trace_id=job.trace_id)

    def _enqueue(self, job: Job) -> None:
        task = job.task
        self._start_ticker()
        job.state = "queued"
        # Accepted before: it goes first and never waits out a deadline.
        self._core.enqueue(job.ticket, self._clock(), resumed=job.adopted)
        if not job.accepted.done():
            job.accepted.set_result(None)
        self._telemetry.queued(job)
        admitted = events.TaskAdmitted(priority=task.priority, queued=len(self._core.queue), adopted=job.adopted)
        tag = (task.agent, task.agent_version)
        self._store.post(task.tenant, admitted, task_id=task.task_id, trace_id=job.trace_id, agent=tag)
        self._report_findings(job, "flagged")
        self._pump()

    async def _through(self, job: Job) -> AgentResult:
        """Waits for a slot and runs the job; again after its worker died or its approval came."""
        task = job.task
        while True:
            try:
                worker = await job.slot
            except RetryLater as dropped:  # it waited past its deadline, or made room for other work
                return await self._reject(task, job.trace_id, dropped, job.admitted_unix)
            except CancelledInQueue:
                return await self._cancelled(job)
            outcome = await self._run_on(worker, job)
            if isinstance(outcome, AgentResult):
                return outcome
            if isinstance(outcome, Paused):
                await self._await_decision(job, outcome)
            elif job.attempt > self.config.max_redispatch:
                return await self._fail(task, job.trace_id, outcome, 0.0)
            else:  # its worker died: run it again elsewhere, from its checkpoint
                job.attempt += 1
                self._durable["redispatched"] += 1
            job.requeue()
            self._telemetry.queued(job)
            self._core.enqueue(job.ticket, self._clock(), resumed=True)
            self._pump()

    async def _run_on(self, worker: int, job: Job) -> AgentResult | Paused | Exception:
        """One dispatch. The run goes on even if the caller is cancelled (ray.cancel, a caller
        gone): the worker ends it and writes its record, and only then is the slot given back."""
        task = job.task
        outcome: AgentResult | Paused | Exception | None = None
        started = self._clock()
        try:  # from the first line: whatever fails here, the slot goes back
            dispatch = Dispatch(
                task=task,
                trace_id=job.trace_id,
                traceparent=self._telemetry.dispatch_traceparent(job),
                admitted_at_unix=job.admitted_unix,
                queued_ms=(started - job.ticket.enqueued_at + job.session_wait_s) * 1000,
                attempt=job.attempt,
                fresh=job.fresh,
                config_version=self._config_version,
            )
            job.fresh = False  # a later dispatch (a retry, after a pause) may find this one's run
            job.state, job.worker = "running", worker
            try:
                sent = await self._calls.send(worker, dispatch)
                if isinstance(sent, RunFailed):  # the worker's run raised: a bug of ours
                    raise WorkerFailed(f"{sent.error_type}: {sent.message}")
                outcome = sent
            except ray.exceptions.ActorDiedError as exc:
                # The process is gone: free the task's lease so the next run need not wait it out.
                self._fleet.suspect(worker)
                with contextlib.suppress(RedisError, OSError):
                    await self._store.release_lease(task.tenant, task.task_id, dispatch.run_id)
                outcome = exc
            except ray.exceptions.RayActorError as exc:  # unreachable, maybe still running: its lease decides
                self._fleet.suspect(worker)
                outcome = exc
            except (ray.exceptions.RayError, AgentPoolError) as exc:
                outcome = await self._fail(task, job.trace_id, exc, dispatch.queued_ms)
        finally:
            job.worker = None
            result = outcome if isinstance(outcome, AgentResult) else None
            self._core.finish(job.ticket, result, self._clock() - started)
            self._pump()
        assert outcome is not None  # the try either set it or raised
        if isinstance(outcome, AgentResult):
            self._counts[outcome.status] += 1
        return outcome

    def _start_ticker(self) -> None:
        if self._ticker is None or self._ticker.done():
            self._ticker = asyncio.get_running_loop().create_task(self._tick())

    async def _tick(self) -> None:
        while True:
            before = self._clock()
            await asyncio.sleep(_TICK_S)
            now = self._clock()
            # How late the event loop woke us: the scheduler's own congestion, reported in status().
            self._loop_lag_s = max(0.0, now - before - _TICK_S)
            for expired in self._core.tick(now):
                self._drop(expired)
            core = self._core
            # A draining pool wants no worker for the work it will not start.
            self._fleet.observe(now, core.slots.in_flight + (0 if core.draining else core.waiting))
            if core.models:
                await self._watch_limiter()
            await self._tick_agents()
            await self._tick_live()

    async def _watch_limiter(self) -> None:
        """Which rate-limited models have calls waiting for permits, and what their buckets hold:
        a model whose calls wait is capped; one whose buckets hold a burst may start that much more."""
        try:  # bounded: a limiter that is restarting must not hold up the deadline sweep
            report: LimiterBacklog = await asyncio.wait_for(self._limiter.backlog.remote(), _TICK_S * 4)
        except (ray.exceptions.RayError, TimeoutError):
            return
        if self._core.limiter_backlog(report):
            self._pump()

    def _note_tenant(self, tenant: str) -> None:
        self._seen.pop(tenant, None)
        self._seen[tenant] = None
        if len(self._seen) > _MAX_SEEN_TENANTS:
            del self._seen[next(iter(self._seen))]

    # --- dispatch ----------------------------------------------------------------------

    def _pump(self) -> None:
        """Carries out the core's dispatch: free worker slots to waiting tasks in fair order,
        drops of tasks that waited longer than they may; then reads on in the Redis backlog
        if the queue has room."""
        again = True
        while again:
            again = False
            for decision in self._core.dispatch(self._clock()):
                if isinstance(decision, Drop):
                    self._drop(decision)
                    continue
                job = decision.ticket.item
                if job.slot.done():  # cancelled, and its life has not run its cleanup yet
                    self._core.finish(decision.ticket)
                    again = True
                    continue
                self._telemetry.dequeued(job, decision.waited_s, decision.worker)
                job.slot.set_result(decision.worker)
        self._kick_pull()
        self._note_idle()

    def _drop(self, drop: Drop[Job]) -> None:
        """Ends a task the core took out of the queue with a rejection (its life writes the record)."""
        job = drop.ticket.item
        if not job.slot.done():
            job.slot.set_exception(drop.error())

    def pid(self) -> int:
        """This actor's process id (for operators, and the chaos tests that kill it)."""
        return os.getpid()
