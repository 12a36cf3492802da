"""The scheduler actor: admits, queues and dispatches tasks, and returns their results.

It returns `AgentResult` values, never refs: the client calls `run.remote`, so the client
owns each task's ref, and the scheduler awaits the worker itself (see DESIGN.md).

Admission, in order: static checks (tenant, tools, models), the tenant's daily budgets
(Redis), then shedding from live state (`LoadShedding`, in load_shedding.py): overload
level, the predicted wait at the tenant's fair share against the task's deadline, and the
queue bound. Waiting tasks are served by weighted fair queueing across tenants
(`FairQueue`) and dropped, not run late, once they have waited longer than they may.
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

from agentpool import events
from agentpool.background import Background
from agentpool.cluster.approvals import Approvals
from agentpool.cluster.budgets import BudgetLedger
from agentpool.cluster.store import ResultStore
from agentpool.cluster.telemetry import Telemetered
from agentpool.config import PoolConfig
from agentpool.errors import AgentPoolError, RetryLater
from agentpool.models import AgentResult, AgentTask
from agentpool.protocol import Admitted, Dispatch, Paused, WorkerSpawn
from agentpool.scheduler.admission import Admission, screen_task
from agentpool.scheduler.alerts import AlertMonitor
from agentpool.scheduler.backlog import BacklogWindow
from agentpool.scheduler.capacity import ModelDispatch
from agentpool.scheduler.control import CancelledInQueue, JobControl
from agentpool.scheduler.fair import FairQueue, token_cost
from agentpool.scheduler.fleet import WorkerFleet
from agentpool.scheduler.jobs import Job, trace_context
from agentpool.scheduler.load_shedding import LoadShedding
from agentpool.scheduler.observe import TaskTelemetry
from agentpool.scheduler.records import Records
from agentpool.scheduler.shedding import DispatchRate, OverloadDetector, WaitCalibration
from agentpool.scheduler.status import StatusView
from agentpool.vocabulary import TaskStatus

#: How often queued tasks are checked against their deadlines and the queue for a standing wait.
_TICK_S = 0.25
#: Tenants whose budgets `status()` reports besides the configured ones.
_MAX_SEEN_TENANTS = 1000

log = logging.getLogger("agentpool.scheduler")


@ray.remote
class Scheduler(JobControl, BacklogWindow, LoadShedding, Records, StatusView, Telemetered):
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
        self._limiter = ray.get_actor(limiter_name, namespace=namespace)
        self._board = ray.get_actor(board_name, namespace=namespace) if board_name else None
        self._admission = Admission(config, set(tool_names))
        self._queue: FairQueue[Job] = FairQueue(self._weight)
        self._telemetry = TaskTelemetry(
            config.name,
            lambda: {t: sum(d.values()) for t, d in self._queue.depth().items()},
            lambda: dict(self._tenant_running),
        )
        self._slots = self._fleet.slots
        self._tenant_running: Counter[str] = Counter()
        self._models = ModelDispatch(config.limits)
        self._jobs: dict[str, Job] = {}
        self._init_backlog()
        #: Records on their way to the relay (`_reply`), and its handle once found.
        self._replies: list[AgentResult] = []
        self._relay: Any = None
        self._namespace = namespace
        self._lives = Background()
        self._writes = Background()
        #: The `run` calls waiting for their task's record (the ones `withdraw` ends).
        self._callers: set[asyncio.Task[Any]] = set()
        self._extra_info = dict(extra_info or {})
        self._store = ResultStore.for_pool(redis_url, config)
        self._ledger = BudgetLedger(
            lambda: self._store.redis, self._store.keys, reservation_ttl_s=config.lease_expiry_s
        )
        a = config.admission
        self._detector = OverloadDetector(a.target_wait_s, a.interval_s, a.escalate_intervals)
        self._rate = DispatchRate()
        self._calibration = WaitCalibration()
        self._clock = time.monotonic
        self._mean_run_s = 1.0
        self._task_cost: dict[str, float] = {}
        self._pool_cost: float | None = None
        self._seen: dict[str, None] = {}
        self._counts: Counter[str] = Counter()
        self._durable: Counter[str] = Counter()
        self._shed: Counter[str] = Counter()
        self._ends: dict[str, Counter[TaskStatus]] = {}
        self._alerts = AlertMonitor(config.alerts)
        self._ticker: asyncio.Task[None] | None = None
        self._loop_lag_s = 0.0
        self._approvals = Approvals(self._store, config.checkpoint_ttl_s)
        self._booted = False
        # Take up what this pool accepted before (a restart): a call to ourselves, which runs
        # as soon as this constructor returns.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self._boot = ray.get_runtime_context().current_actor.boot.remote()

    def info(self) -> dict[str, Any]:
        """What `AgentPool.connect` needs to attach to this pool."""
        return {"config": self.config.model_dump(mode="json"), "redis_url": self.redis_url, **self._extra_info}

    async def run(self, task: AgentTask, traceparent: str) -> AgentResult:
        """Admits and runs one task; always returns its final record.

        The task_id is the idempotency key: a task already finished returns its record, and
        one submitted again while it runs shares the first run. Once accepted, a task is the
        scheduler's: if this call is cancelled, or its caller dies, the task still runs.
        `traceparent` is the W3C trace context the task's trace continues from.
        """
        caller = asyncio.current_task()
        if caller is not None:
            self._callers.add(caller)
        job = self._job_for(task, traceparent)
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
    ) -> Job:
        # Registered before the first await, so a duplicate arriving meanwhile joins this job.
        job = Job(task, trace_context(context), admitted_unix or time.time())
        job.adopted, job.from_backlog = adopted, from_backlog
        self._jobs[task.task_id] = job
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
                rejection = None if job.adopted else await self._admission_check(job)
                if rejection is not None:
                    return await self._reject(task, trace_id, rejection, job.admitted_unix)
                if self._defer(job, arrival):
                    if not job.callers:
                        self._telemetry.backlogged(job)
                        return None
                    if not await self._wait_in_backlog(job):
                        return await self._cancelled(job)
            self._enqueue(job)
            return await self._through(job)
        except Exception as exc:  # ray.get must never raise for a task: report it as a result
            self._abandon(job)
            return await self._fail(task, trace_id, exc, 0.0)

    def _abandon(self, job: Job) -> None:
        """Takes a job an error stopped out of the queue, and gives back a slot it holds, so
        that nothing of it is left to be dispatched or counted as running."""
        if job.state == "queued":
            self._queue.remove(job.task.tenant, job)
        if not job.slot.done():
            job.slot.cancel()
        self._release_job(job)

    async def _admission_check(self, job: Job) -> AgentPoolError | None:
        task = job.task
        self._start_ticker()
        self._note_tenant(task.tenant)
        rejection = self._admission.check(task)
        policy = self.config.policy_for(task.tenant)
        if rejection is None and policy is not None and policy.guardrails.injection != "off":
            job.findings, rejection = screen_task(task, policy.guardrails)
            if rejection is not None:
                self._report_findings(job, "rejected")
        if rejection is None and policy is not None:
            first_call = math.ceil((len(task.prompt) + len(task.system or "")) / self.config.input_chars_per_token)
            rejection = await self._ledger.check(task.tenant, policy, first_call + task.max_tokens)
        # No await between the shedding decision and the enqueue: concurrent arrivals must
        # not all pass the check before any of them is counted.
        return rejection if rejection is not None else self._shed_or_make_room(job, self._limit_key(task))

    def _report_findings(self, job: Job, action: str) -> None:
        for source, rules in job.findings.items():
            found = events.InjectionDetected(source=source, rules=rules, action=action)
            self._store.post(job.task.tenant, found, task_id=job.task.task_id, trace_id=job.trace_id)

    def _enqueue(self, job: Job) -> None:
        task = job.task
        self._start_ticker()
        job.state = "queued"
        job.enqueued_at = self._clock()
        job.limit_key = self._limit_key(task)
        job.estimate = self._estimate(task)
        if job.adopted:  # accepted before: it goes first and never waits out a deadline
            self._queue.push(task.tenant, "critical", job, front=True)
        else:
            job.max_wait_s = self._max_wait_s(task)
            self._queue.push(task.tenant, task.priority, job)
        if not job.accepted.done():
            job.accepted.set_result(None)
        self._telemetry.queued(job)
        admitted = events.TaskAdmitted(priority=task.priority, queued=len(self._queue), adopted=job.adopted)
        self._store.post(task.tenant, admitted, task_id=task.task_id, trace_id=job.trace_id)
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
            job.requeue(self._clock())
            self._telemetry.queued(job)
            self._queue.push(task.tenant, "critical", job, front=True)
            self._pump()

    async def _run_on(self, worker: int, job: Job) -> AgentResult | Paused | Exception:
        """One dispatch. The run goes on even if the caller is cancelled (ray.cancel, a caller
        gone): the worker ends it and writes its record, and only then is the slot given back."""
        task = job.task
        outcome: AgentResult | Paused | Exception
        try:  # from the first line: whatever fails here, the slot goes back
            dispatch = Dispatch(
                task=task,
                trace_id=job.trace_id,
                traceparent=self._telemetry.dispatch_traceparent(job),
                admitted_at_unix=job.admitted_unix,
                queued_ms=(self._clock() - job.enqueued_at) * 1000,
                attempt=job.attempt,
            )
            job.state, job.worker = "running", worker
            started = self._clock()
            try:
                outcome = await self._fleet.handles[worker].run.remote(dispatch)
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
            if isinstance(outcome, AgentResult):
                run_s = self._clock() - started
                self._mean_run_s = 0.9 * self._mean_run_s + 0.1 * run_s
                self._models.learn(job.limit_key, outcome, run_s)  # before the slot is given back
        finally:
            job.worker = None
            self._release_job(job)
        if isinstance(outcome, AgentResult):
            self._account(task.tenant, job.estimate, outcome)
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
            self._expire_waiting(now)
            self._fleet.observe(now, self._slots.in_flight + len(self._queue) + self._waiting_total)
            if self._models:
                await self._watch_limiter()

    async def _watch_limiter(self) -> None:
        """Which rate-limited models have calls waiting for permits. Only those are capped:
        while a model's buckets still hold a burst, its tasks are dispatched as fast as they come."""
        try:  # bounded: a limiter that is restarting must not hold up the deadline sweep
            waiting: dict[str, int] = await asyncio.wait_for(self._limiter.backlog.remote(), _TICK_S * 4)
        except (ray.exceptions.RayError, TimeoutError):
            return
        if self._models.backlog(waiting):
            self._pump()

    # --- fair sharing --------------------------------------------------------------------

    def _weight(self, tenant: str) -> float:
        policy = self.config.policy_for(tenant)
        return policy.weight if policy is not None else 1.0

    def _estimate(self, task: AgentTask) -> float:
        """Service a task will receive, in VTC units, until its real usage is known."""
        known = self._task_cost.get(task.tenant, self._pool_cost)
        return known if known is not None else token_cost(len(task.prompt) / 4, task.max_tokens)

    def _account(self, tenant: str, estimate: float, result: AgentResult) -> None:
        u = result.usage
        actual = token_cost(u.input_tokens + u.cache_creation_input_tokens + u.cache_read_input_tokens, u.output_tokens)
        self._queue.charge(tenant, actual - estimate)
        if result.iterations:
            known = self._task_cost.pop(tenant, None)
            self._task_cost[tenant] = actual if known is None else 0.8 * known + 0.2 * actual
            if len(self._task_cost) > _MAX_SEEN_TENANTS:  # least recently finished first
                del self._task_cost[next(iter(self._task_cost))]
            # A tenant's first tasks are estimated from everyone's, not from max_tokens.
            self._pool_cost = actual if self._pool_cost is None else 0.95 * self._pool_cost + 0.05 * actual

    def _note_tenant(self, tenant: str) -> None:
        self._seen.pop(tenant, None)
        self._seen[tenant] = None
        if len(self._seen) > _MAX_SEEN_TENANTS:
            del self._seen[next(iter(self._seen))]

    # --- dispatch ----------------------------------------------------------------------

    def _pump(self) -> None:
        """Hands free worker slots to waiting tasks in fair order, skipping tenants at their
        concurrency cap and dropping tasks that have waited longer than they may; then reads
        on in the Redis backlog if the queue has room."""
        if self._dispatch():
            self._detector.idle()
        self._kick_pull()

    def _dispatch(self) -> bool:
        """Dispatches while a slot and an eligible task remain; True if the queue emptied."""
        while len(self._queue):
            worker = self._slots.acquire()
            if worker is None:
                return False
            popped = self._queue.pop(
                lambda tenant, job: self._tenant_has_room(tenant) and self._models.has_room(job.limit_key)
            )
            if popped is None:
                self._slots.release(worker)
                return False
            tenant, job = popped
            if job.slot.done():  # cancelled, and its life has not run its cleanup yet
                self._slots.release(worker)
                continue
            now = self._clock()
            waited = now - job.enqueued_at
            if waited > job.max_wait_s:
                self._slots.release(worker)
                self._expire(job, waited, now)
                continue
            self._calibrate(job, waited, now)
            if job.watched:
                self._detector.observe(waited, now)
            self._rate.record(now)
            self._queue.charge(tenant, job.estimate)
            self._tenant_running[tenant] += 1
            self._models.started(job.limit_key)
            self._telemetry.dequeued(job, waited, worker)
            job.held = worker
            job.slot.set_result(worker)
        return True

    def _tenant_has_room(self, tenant: str) -> bool:
        policy = self.config.policy_for(tenant)
        cap = policy.max_concurrency if policy is not None else None
        return cap is None or self._tenant_running[tenant] < cap

    def _limit_key(self, task: AgentTask) -> str | None:
        """The limits entry governing the first model this task will call."""
        chain = self.config.models_for(task.tenant, task.model, task.fallback_models)
        return self.config.limit_key(chain[0]) if chain else None

    def _release_job(self, job: Job) -> None:
        """Gives back the slot the job holds, if it holds one (at most once per grant)."""
        worker, job.held = job.held, None
        if worker is None:
            return
        tenant = job.task.tenant
        self._slots.release(worker)
        self._tenant_running[tenant] -= 1
        if self._tenant_running[tenant] <= 0:
            del self._tenant_running[tenant]
        self._models.finished(job.limit_key)
        self._pump()

    def pid(self) -> int:
        """This actor's process id (for operators, and the chaos tests that kill it)."""
        return os.getpid()
