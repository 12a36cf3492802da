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

Events (methods): `drain`/`undrain` (stop and start taking work), `admit` (an arrival),
`enqueue` (accepted now, adopted, or queued again after its worker died or its approval
came), `dispatch` (slots free and work waiting), `finish` (a run ended or was given up: its
slot back, and what it taught), `remove` (cancelled while queued), `tick` (deadlines, and
the standing-queue watch), `limiter_backlog` (which models have calls waiting for permits,
and what their buckets hold).

Decisions: `Admit` (with the queued tasks it evicted to make room), `Reject` (a reason and
a retry hint), `Start` (a task and its worker), `Drop` (a queued task ends: evicted, or it
waited longer than it may).

Admission is a list of rules tried in order (`DEFAULT_RULES`, in rules.py): a rule is a
small object that looks at the arrival and the core and answers a `Reject`, a `Drop` (it
made room by evicting someone; the arrival goes on) or None. A new rule is one class and
one line. The tickets and decisions are in decisions.py.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Generic, TypeVar

from agentpool.config import PoolConfig
from agentpool.models import AgentResult, AgentTask
from agentpool.scheduler.capacity import LimiterBacklog, ModelDispatch
from agentpool.scheduler.decisions import Admit, Drop, Place, Reject, Start, Ticket
from agentpool.scheduler.dispatch import LeastLoaded
from agentpool.scheduler.fair import FairQueue, token_cost
from agentpool.scheduler.rules import (
    DEFAULT_RULES,
    DRAIN_RETRY_EXTRA_S,
    MAX_RETRY_S,
    MIN_RETRY_S,
    UNKNOWN_WAIT_RETRY_S,
    QueueBound,
    RefuseWhileDraining,
    Rule,
    ShedOnOverload,
    WaitWithinDeadline,
)
from agentpool.scheduler.shedding import ClassCalibration, DispatchRate, OverloadDetector, WaitForecast
from agentpool.vocabulary import ErrorReason

__all__ = [
    "DEFAULT_RULES",
    "DRAIN_RETRY_EXTRA_S",
    "MAX_RETRY_S",
    "MIN_RETRY_S",
    "UNKNOWN_WAIT_RETRY_S",
    "Admit",
    "Drain",
    "Drop",
    "Place",
    "QueueBound",
    "RefuseWhileDraining",
    "Reject",
    "Rule",
    "SchedulerCore",
    "ShedOnOverload",
    "Start",
    "Ticket",
    "WaitForecast",
    "WaitWithinDeadline",
]

T = TypeVar("T")

#: Tenants whose cost per task is remembered (least recently finished forgotten first).
MAX_COSTED_TENANTS = 1000
#: A queued task whose deadline falls within this many dispatch intervals of its model
#: starts at the next free slot, ahead of fair order (see `SchedulerCore.dispatch`).
RESCUE_DISPATCHES = 1.0


@dataclass(frozen=True)
class Drain:
    """A drain in progress: since when, and the end of its grace period (monotonic s)."""

    since: float
    until: float


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
        #: A drain in progress: no arrival is admitted and no queued task starts.
        self.draining: Drain | None = None
        self._costs = _Costs()
        #: (deadline, order, ticket) of every queued task that may wait only so long, and
        #: stale entries (started, dropped, queued again), dropped when met.
        self._deadlines: list[tuple[float, int, Ticket[T]]] = []
        self._order = itertools.count()

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
        ahead = self.queue.length(tenant, at_least=task.priority)
        return WaitForecast(ahead, share, self.service_rate(ticket), self.models.excess(ticket.limit_key))

    def service_rate(self, ticket: Ticket[T]) -> float:
        """Tasks per second the pool can start for the ticket's model: its slots' turnover, and
        no faster than the model's rate limits allow."""
        rate = self.slots.capacity / max(self.mean_run_s, 1e-3)
        key_rate = self.models.tasks_per_s(ticket.limit_key)
        return rate if key_rate is None else min(rate, key_rate)

    def standing(self, ticket: Ticket[T]) -> tuple[int, float] | None:
        """A queued ticket's place (its tenant's items ahead of it) and the wait forecast
        from there, in seconds; None if it is not queued."""
        ahead = self.queue.ahead(ticket.tenant, ticket)
        if ahead is None:
            return None
        return ahead, replace(self.forecast(ticket), ahead=ahead).seconds()

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
        if math.isfinite(ticket.max_wait_s):
            self._file_deadline(ticket)  # queued first: a rebuild of the heap keeps it

    def reconfigure(self, config: PoolConfig) -> None:
        """A new configuration while the pool runs (`pool.update_config`): tenants' weights,
        caps and the queue bound apply from the next decision, limits keep what was learnt
        of each model kept (`ModelDispatch.retune`)."""
        self.config = config
        self.models.retune(config.limits)

    def drain(self, now: float, grace_s: float) -> None:
        """Stops taking work: from now on every arrival is refused (`RefuseWhileDraining`)
        and no queued task starts, until `undrain`. Running tasks go on to their end."""
        self.draining = Drain(now, now + max(0.0, grace_s))

    def undrain(self) -> None:
        """Takes work again after a drain (the shell dispatches what waited)."""
        self.draining = None

    def dispatch(self, now: float) -> list[Start[T] | Drop[T]]:
        """Hands free slots to waiting tasks in fair order, skipping tenants at their
        concurrency cap and models at their dispatch cap, and dropping tasks that waited
        longer than they may. A draining core starts nothing (`tick` still drops).

        One exception to fair order: a task whose deadline falls before its model's next
        dispatch is expected (`RESCUE_DISPATCHES` intervals of `service_rate`) starts first,
        earliest deadline first, since waiting for its fair turn would drop it. Its tenant is
        charged as usual, so the shares even out over the next turns; admission already
        decided that it fits, and later arrivals of a higher class or a tenant further
        behind, which go ahead of it in fair order, are what would have made it late."""
        out: list[Start[T] | Drop[T]] = []
        if self.draining is not None:
            return out
        while len(self.queue):
            worker = self.slots.acquire()
            if worker is None:
                return out
            popped = self._due(now) or self.queue.pop(self._eligible)
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

    def limiter_backlog(self, report: LimiterBacklog) -> bool:
        """The limiter's calls waiting per limit key and what its buckets hold (see
        `ModelDispatch`); True when some key may start more than before (dispatch may go on)."""
        return self.models.backlog(report)

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

    def _file_deadline(self, ticket: Ticket[T]) -> None:
        heap = self._deadlines
        heapq.heappush(heap, (ticket.enqueued_at + ticket.max_wait_s, next(self._order), ticket))
        if len(heap) > 2 * len(self.queue) + 64:  # mostly stale: rebuild it
            self._deadlines = [entry for entry in heap if self._filed(entry)]
            heapq.heapify(self._deadlines)

    @staticmethod
    def _filed(entry: tuple[float, int, Ticket[T]]) -> bool:
        """Whether a deadline entry is its ticket's current one (still queued, same turn)."""
        deadline, _, ticket = entry
        return ticket.place is Place.QUEUED and ticket.enqueued_at + ticket.max_wait_s == deadline

    def _due(self, now: float) -> tuple[str, Ticket[T]] | None:
        """The eligible queued task with the earliest deadline, taken out of the queue, if that
        deadline comes before its model's next dispatch is expected (see `dispatch`)."""
        heap, passed = self._deadlines, []
        found: Ticket[T] | None = None
        while heap:
            entry = heap[0]
            deadline, _, ticket = entry
            if not self._filed(entry):
                heapq.heappop(heap)
                continue
            if deadline > now + RESCUE_DISPATCHES / max(self.service_rate(ticket), 1e-9):
                break
            passed.append(heapq.heappop(heap))
            if self._eligible(ticket.tenant, ticket):
                found = ticket
                break
        for entry in passed[: -1 if found is not None else None]:
            heapq.heappush(heap, entry)
        if found is None:
            return None
        self.queue.remove(found.tenant, found)
        return found.tenant, found

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
