"""The scheduler's pure core: admission from live state, the fair queue, and dispatch.

No Ray, no Redis, no asyncio: every event takes `now` (monotonic seconds) from the caller,
and every answer is a typed decision the caller carries out. The `Scheduler` actor is the
I/O shell around it: it runs the static checks and the budgets (Redis) first, then asks
the core, and turns the decisions into futures resolved, records written and events posted.

What the core holds: the tenants' queues and fair shares (`FairQueue`, by service
received), priorities, the workers' slots (`LeastLoaded`, shared with the fleet, which adds,
closes and retires workers), per-model dispatch caps (`ModelDispatch`), tenant concurrency
caps, the overload detector and the wait calibration, and the cost estimates that charge a
tenant for a task until its real usage is known.

Events (methods): `admit` (an arrival), `enqueue` (accepted now, adopted, or queued again
after its worker died or its approval came), `dispatch` (slots free and work waiting),
`finish` (a run ended or was given up: its slot back, and what it taught), `remove`
(cancelled while queued), `tick` (deadlines, and the standing-queue watch), `limiter_backlog`
(which models have calls waiting for permits).

Decisions: `Admit` (with the queued tasks it evicted to make room), `Reject` (a reason and
a retry hint), `Start` (a task and its worker), `Drop` (a queued task ends: evicted, or it
waited longer than it may).

Admission is a list of rules tried in order (`DEFAULT_RULES`): a rule is a small object
that looks at the arrival and the core and answers a `Reject`, a `Drop` (it made room by
evicting someone; the arrival goes on) or None. A new rule is one class and one line.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Generic, Protocol, TypeVar

from agentpool.config import PoolConfig
from agentpool.errors import Overloaded
from agentpool.models import AgentResult, AgentTask
from agentpool.scheduler.capacity import ModelDispatch
from agentpool.scheduler.dispatch import LeastLoaded
from agentpool.scheduler.fair import FairQueue, token_cost
from agentpool.scheduler.shedding import (
    ClassCalibration,
    DispatchRate,
    OverloadDetector,
    WaitForecast,
    interactive,
    sheds,
)
from agentpool.vocabulary import ErrorReason

T = TypeVar("T")

#: Tenants whose cost per task is remembered (least recently finished forgotten first).
MAX_COSTED_TENANTS = 1000
#: The retry hint of a rejection whose wait cannot be forecast (no rate measured yet).
UNKNOWN_WAIT_RETRY_S = 60.0
#: Retry hints are at least a tenth of a second and at most an hour.
MIN_RETRY_S, MAX_RETRY_S = 0.1, 3600.0


class Place(StrEnum):
    """Where a ticket is, as far as the core knows."""

    NEW = "new"  # not yet queued
    QUEUED = "queued"
    RUNNING = "running"  # holds a worker slot
    OUT = "out"  # ended, dropped, cancelled, paused or waiting in Redis: nothing of the core's


@dataclass(eq=False)
class Ticket(Generic[T]):
    """The core's view of one task: what it needs to queue, dispatch and charge it.

    `item` is the shell's own handle on the task (the scheduler's `Job`), handed back in
    decisions."""

    item: T
    task: AgentTask
    #: The limits entry of the first model the task will call (None: not rate limited).
    limit_key: str | None
    place: Place = Place.NEW
    #: Ran before (adopted at a restart, its worker died, its approval came): queued first,
    #: as `critical`, and never dropped for waiting.
    resumed: bool = False
    enqueued_at: float = 0.0
    max_wait_s: float = math.inf
    #: The wait forecast at admission, until the wait it got is reported.
    predicted_wait_s: float | None = None
    #: Service charged at dispatch until the task's real usage is known (VTC units).
    estimate: float = 0.0
    #: The worker slot it holds (Place.RUNNING).
    worker: int | None = None

    @property
    def tenant(self) -> str:
        return self.task.tenant

    @property
    def watched(self) -> bool:
        """Interactive work waiting its first turn: its waits are what tells an overload."""
        return not self.resumed and interactive(self.task.priority, self.task.deadline_s)


@dataclass(frozen=True)
class Reject:
    """An arrival refused: why, and when trying again may succeed."""

    reason: ErrorReason
    message: str
    retry_after_s: float

    def error(self, tenant: str) -> Overloaded:
        return Overloaded(self.message, tenant=tenant, reason=self.reason, retry_after_s=self.retry_after_s)


@dataclass(frozen=True)
class Drop(Generic[T]):
    """A queued task that ends without running: out of the queue already."""

    ticket: Ticket[T]
    reason: ErrorReason
    message: str
    retry_after_s: float

    def error(self) -> Overloaded:
        return Overloaded(
            f"dropped from the queue: {self.message}",
            tenant=self.ticket.tenant,
            reason=self.reason,
            retry_after_s=self.retry_after_s,
        )


@dataclass(frozen=True)
class Admit(Generic[T]):
    """An arrival accepted (not queued yet: the shell queues it, or leaves it in Redis)."""

    ticket: Ticket[T]
    evicted: tuple[Drop[T], ...] = ()


@dataclass(frozen=True)
class Start(Generic[T]):
    """A queued task goes to a worker slot, after waiting `waited_s`."""

    ticket: Ticket[T]
    worker: int
    waited_s: float


class Rule(Protocol):
    """One admission rule: a refusal, an eviction that made room, or None (no objection)."""

    def __call__(self, core: SchedulerCore[T], ticket: Ticket[T], now: float) -> Reject | Drop[T] | None: ...


class ShedOnOverload:
    """A standing queue of interactive work sheds interactive arrivals by class (CoDel)."""

    def __call__(self, core: SchedulerCore[T], ticket: Ticket[T], now: float) -> Reject | None:
        task = ticket.task
        if not sheds(task.priority, core.detector.level(now), task.deadline_s):
            return None
        return Reject(
            ErrorReason.OVERLOAD,
            f"the pool is overloaded: {task.priority} work is shed until the queue drains",
            core.config.admission.interval_s,
        )


class WaitWithinDeadline:
    """An arrival that must queue is refused when its predicted wait, scaled by how far recent
    forecasts fell short, exceeds what it may wait. A forecast task keeps its forecast, so the
    wait it gets calibrates the next ones."""

    def __call__(self, core: SchedulerCore[T], ticket: Ticket[T], now: float) -> Reject | None:
        task = ticket.task
        limit = core.max_wait_s(task)
        if not math.isfinite(limit):  # a batch task: it waits its turn, however long
            return None
        must_queue = (
            core.slots.in_flight >= core.slots.capacity
            or not core.tenant_has_room(task.tenant)
            or not core.models.has_room(ticket.limit_key)
        )
        if not must_queue and not core.queue.length(task.tenant):
            return None
        forecast = core.forecast(ticket).seconds()
        ticket.predicted_wait_s = forecast
        wait = forecast * core.calibration.factor(task.priority, now)
        if wait <= limit:
            return None
        return Reject(
            ErrorReason.PREDICTED_WAIT,
            f"predicted queue wait {wait:.1f}s exceeds the {limit:.1f}s this task may wait",
            _retry_hint(wait - limit) if math.isfinite(wait) else UNKNOWN_WAIT_RETRY_S,
        )


class QueueBound:
    """The backlog (in memory and in Redis) holds at most `max_queued` tasks: a full one makes
    room by evicting less important work (or a hog's newest), or refuses the arrival."""

    #: It changes the queue when it admits: `SchedulerCore.refusal` leaves it to `admit`.
    evicts = True

    def __call__(self, core: SchedulerCore[T], ticket: Ticket[T], now: float) -> Reject | Drop[T] | None:
        task = ticket.task
        if core.waiting < core.config.max_queued:
            return None
        victim = core.queue.evict_for(task.tenant, task.priority)
        if victim is None:
            wait = core.forecast(ticket).seconds()
            return Reject(
                ErrorReason.QUEUE_FULL,
                f"queue is full ({core.waiting} tasks waiting)",
                _retry_hint(wait) if math.isfinite(wait) else UNKNOWN_WAIT_RETRY_S,
            )
        return core.dropped(victim[1], ErrorReason.EVICTED, f"made room for {task.priority} work of another tenant")


def _retry_hint(seconds: float) -> float:
    return round(min(max(MIN_RETRY_S, seconds), MAX_RETRY_S), 3)


#: Admission from live state, in order.
DEFAULT_RULES: tuple[Rule, ...] = (ShedOnOverload(), WaitWithinDeadline(), QueueBound())


@dataclass
class _Costs:
    """What a task of each tenant has cost lately (VTC units), and of anyone's."""

    per_tenant: dict[str, float] = field(default_factory=dict)
    pool: float | None = None


class SchedulerCore(Generic[T]):
    """Admission from live state, queueing and dispatch (see the module docstring).

    Args:
        config: The pool's configuration (tenant policies, limits, admission settings,
            `max_queued`).
        slots: The workers' slots; the fleet adds and removes workers on the same object.
        rules: Admission rules, tried in order.
    """

    def __init__(self, config: PoolConfig, slots: LeastLoaded, rules: Sequence[Rule] = DEFAULT_RULES) -> None:
        self.config = config
        self.slots = slots
        self.rules = tuple(rules)
        self.queue: FairQueue[Ticket[T]] = FairQueue(self.weight)
        #: Tasks running per tenant.
        self.running: Counter[str] = Counter()
        self.models = ModelDispatch(config.limits)
        a = config.admission
        self.detector = OverloadDetector(a.target_wait_s, a.interval_s, a.escalate_intervals)
        self.calibration = ClassCalibration()
        self.rate = DispatchRate()
        #: Mean run time of a task (s), for the wait forecast.
        self.mean_run_s = 1.0
        #: Accepted tasks waiting outside memory (the Redis backlog): they count against
        #: `max_queued` like the queue's own.
        self.outside = 0
        self._costs = _Costs()

    # --- views ---------------------------------------------------------------------------

    @property
    def waiting(self) -> int:
        """Every accepted task not running yet: queued here, and waiting outside."""
        return len(self.queue) + self.outside

    def ticket(self, item: T, task: AgentTask) -> Ticket[T]:
        """A new task's ticket; it governs the task in the core until it ends."""
        chain = self.config.task_models(task)
        return Ticket(item, task, self.config.limit_key(chain[0]) if chain else None)

    def weight(self, tenant: str) -> float:
        policy = self.config.policy_for(tenant)
        return policy.weight if policy is not None else 1.0

    def tenant_has_room(self, tenant: str) -> bool:
        policy = self.config.policy_for(tenant)
        cap = policy.max_concurrency if policy is not None else None
        return cap is None or self.running[tenant] < cap

    def max_wait_s(self, task: AgentTask) -> float:
        """How long the task may wait in the queue: its deadline and the configured cap, if
        any; a task with neither waits its turn however long the backlog is."""
        limit = self.config.admission.max_queue_wait_s
        return min(limit or math.inf, task.deadline_s if task.deadline_s is not None else math.inf)

    def forecast(self, ticket: Ticket[T]) -> WaitForecast:
        """The wait one more task of the ticket's tenant and class would have: the work of its
        tenant ahead of it at the tenant's fair share of the dispatch rate."""
        task = ticket.task
        tenant = task.tenant
        backlogged = set(self.queue.backlogged()) | {tenant}
        share = self.weight(tenant) / sum(self.weight(t) for t in backlogged)
        rate = self.slots.capacity / max(self.mean_run_s, 1e-3)
        policy = self.config.policy_for(tenant)
        if policy is not None and policy.max_concurrency is not None:
            # A tenant at its concurrency cap is served no faster than its cap allows.
            share = min(share, policy.max_concurrency / max(self.mean_run_s, 1e-3) / rate)
        key_rate = self.models.tasks_per_s(ticket.limit_key)
        if key_rate is not None:
            rate = min(rate, key_rate)  # a rate-limited model is served no faster than its limits allow
        return WaitForecast(self.queue.length(tenant, at_least=task.priority), share, rate)

    def standing(self, ticket: Ticket[T]) -> tuple[int, float] | None:
        """A queued ticket's place (its tenant's items ahead of it) and the wait forecast
        from there, in seconds; None if it is not queued."""
        ahead = self.queue.ahead(ticket.tenant, ticket)
        if ahead is None:
            return None
        whole = self.forecast(ticket)
        return ahead, WaitForecast(ahead, whole.share, whole.rate_per_s).seconds()

    def estimate(self, task: AgentTask) -> float:
        """Service a task will receive, in VTC units, until its real usage is known: what its
        tenant's tasks cost lately, else anyone's, else its prompt and `max_tokens`."""
        known = self._costs.per_tenant.get(task.tenant, self._costs.pool)
        return known if known is not None else token_cost(len(task.prompt) / 4, task.max_tokens)

    # --- events --------------------------------------------------------------------------

    def admit(self, ticket: Ticket[T], now: float) -> Admit[T] | Reject:
        """An arrival (past the static checks and budgets): the rules' verdict. The shell
        queues an admitted ticket (`enqueue`) with no await in between, so that concurrent
        arrivals cannot all pass before any of them is counted."""
        evicted: list[Drop[T]] = []
        for rule in self.rules:
            verdict = rule(self, ticket, now)
            if isinstance(verdict, Reject):
                return verdict
            if verdict is not None:
                evicted.append(verdict)
        return Admit(ticket, tuple(evicted))

    def refusal(self, ticket: Ticket[T], now: float) -> Reject | None:
        """The rules' refusal of an arrival, if any, changing nothing: the shell asks before
        it records an arrival in the backlog, so work refused at once costs no write there.
        Rules that make room by evicting (`evicts`) are left to `admit`, which decides again."""
        for rule in self.rules:
            if getattr(rule, "evicts", False):
                continue
            verdict = rule(self, ticket, now)
            if isinstance(verdict, Reject):
                return verdict
        return None

    def enqueue(self, ticket: Ticket[T], now: float, *, resumed: bool = False) -> None:
        """Queues a ticket: new work at the back of its tenant's class; work that ran before
        or was accepted before (`resumed`) first, as `critical`, with no limit on its wait."""
        if ticket.place is Place.QUEUED or ticket.place is Place.RUNNING:
            raise ValueError(f"task {ticket.task.task_id} is {ticket.place} already")
        if ticket.place is Place.NEW:
            ticket.estimate = self.estimate(ticket.task)
        ticket.enqueued_at = now
        ticket.resumed = ticket.resumed or resumed
        if ticket.resumed:
            ticket.max_wait_s = math.inf
            self.queue.push(ticket.tenant, "critical", ticket, front=True)
        else:
            ticket.max_wait_s = self.max_wait_s(ticket.task)
            self.queue.push(ticket.tenant, ticket.task.priority, ticket)
        ticket.place = Place.QUEUED

    def dispatch(self, now: float) -> list[Start[T] | Drop[T]]:
        """Hands free slots to waiting tasks in fair order, skipping tenants at their
        concurrency cap and models at their dispatch cap, and dropping tasks that waited
        longer than they may."""
        out: list[Start[T] | Drop[T]] = []
        while len(self.queue):
            worker = self.slots.acquire()
            if worker is None:
                return out
            popped = self.queue.pop(self._eligible)
            if popped is None:
                self.slots.release(worker)
                return out
            tenant, ticket = popped
            waited = now - ticket.enqueued_at
            if waited > ticket.max_wait_s:
                self.slots.release(worker)
                out.append(self._expire(ticket, waited, now))
                continue
            self.report_wait(ticket, waited, now)
            if ticket.watched:
                self.detector.observe(waited, now)
            self.rate.record(now)
            self.queue.charge(tenant, ticket.estimate)
            self.running[tenant] += 1
            self.models.started(ticket.limit_key)
            ticket.worker, ticket.place = worker, Place.RUNNING
            out.append(Start(ticket, worker, waited))
        self.detector.idle()  # the queue emptied: no standing queue
        return out

    def finish(self, ticket: Ticket[T], result: AgentResult | None = None, run_s: float = 0.0) -> None:
        """A run ended (with its record, or without: its worker died, it paused, it failed),
        or a task is given up wherever it was: it leaves the queue, gives its slot back, and
        what its record shows is learnt (the model's capacity, its tenant's cost, the
        correction of the estimate charged at dispatch)."""
        if ticket.place is Place.QUEUED:
            self.queue.remove(ticket.tenant, ticket)
        if result is not None:
            self.mean_run_s = 0.9 * self.mean_run_s + 0.1 * run_s
            self.models.learn(ticket.limit_key, result, run_s)  # before the slot is given back
        worker, ticket.worker = ticket.worker, None
        if worker is not None:
            tenant = ticket.tenant
            self.slots.release(worker)
            self.running[tenant] -= 1
            if self.running[tenant] <= 0:
                del self.running[tenant]
            self.models.finished(ticket.limit_key)
        ticket.place = Place.OUT
        if result is not None:
            self._account(ticket, result)

    def remove(self, ticket: Ticket[T]) -> bool:
        """Takes a queued ticket out of the queue (cancelled there); False if it is not queued."""
        if ticket.place is not Place.QUEUED or not self.queue.remove(ticket.tenant, ticket):
            return False
        ticket.place = Place.OUT
        return True

    def tick(self, now: float) -> list[Drop[T]]:
        """Drops the tasks that waited longer than they may, and shows the detector how long
        the oldest interactive task has waited (or that none waits)."""
        drops: list[Drop[T]] = []
        oldest: float | None = None
        for tenant, _, ticket in self.queue.items():
            waited = now - ticket.enqueued_at
            if waited > ticket.max_wait_s:
                self.queue.remove(tenant, ticket)
                drops.append(self._expire(ticket, waited, now))
            elif ticket.watched:
                oldest = waited if oldest is None else max(oldest, waited)
        if oldest is not None:
            self.detector.observe(oldest, now)
        else:
            self.detector.idle()
        return drops

    def limiter_backlog(self, waiting: Mapping[str, int]) -> bool:
        """The limiter's calls waiting per limit key (only those keys are capped); True when
        some key stopped being capped (dispatch may go on)."""
        return self.models.backlog(waiting)

    def dropped(self, ticket: Ticket[T], reason: ErrorReason, why: str) -> Drop[T]:
        """Ends a ticket already out of the queue without running it (retry after an interval)."""
        ticket.place = Place.OUT
        return Drop(ticket, reason, why, self.config.admission.interval_s)

    def report_wait(self, ticket: Ticket[T], waited: float, now: float) -> None:
        """Reports a forecast task's wait to the calibration (once: dispatched or dropped)."""
        if ticket.predicted_wait_s is not None:
            self.calibration.observe(ticket.task.priority, ticket.predicted_wait_s, waited, now)
            ticket.predicted_wait_s = None

    # --- inside ----------------------------------------------------------------------------

    def _eligible(self, tenant: str, ticket: Ticket[T]) -> bool:
        """Whether a tenant's next task may start now: its tenant and its model have room."""
        return self.tenant_has_room(tenant) and self.models.has_room(ticket.limit_key)

    def _expire(self, ticket: Ticket[T], waited: float, now: float) -> Drop[T]:
        """A task, out of the queue now, that waited longer than it may."""
        self.report_wait(ticket, waited, now)
        return self.dropped(
            ticket, ErrorReason.QUEUE_TIMEOUT, f"waited {waited:.1f}s, longer than its {ticket.max_wait_s:.1f}s"
        )

    def _account(self, ticket: Ticket[T], result: AgentResult) -> None:
        u = result.usage
        actual = token_cost(u.input_tokens + u.cache_creation_input_tokens + u.cache_read_input_tokens, u.output_tokens)
        tenant = ticket.tenant
        self.queue.charge(tenant, actual - ticket.estimate)
        if result.iterations:
            costs = self._costs
            known = costs.per_tenant.pop(tenant, None)
            costs.per_tenant[tenant] = actual if known is None else 0.8 * known + 0.2 * actual
            if len(costs.per_tenant) > MAX_COSTED_TENANTS:  # least recently finished first
                del costs.per_tenant[next(iter(costs.per_tenant))]
            # A tenant's first tasks are estimated from everyone's, not from max_tokens.
            costs.pool = actual if costs.pool is None else 0.95 * costs.pool + 0.05 * actual
