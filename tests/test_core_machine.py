"""The scheduler's pure core under random events: shares under contention, and a state machine
that checks after every step what must always hold (every task in one place, no cap
exceeded, work-conserving dispatch, every refusal with a reason and a retry hint, nothing
admitted or started while draining)."""

from __future__ import annotations

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from agentpool.models import TenantPolicy
from agentpool.scheduler.capacity import LimiterBacklog
from agentpool.scheduler.core import (
    MAX_RETRY_S,
    Drop,
    Place,
    Reject,
    SchedulerCore,
    Start,
    Ticket,
)
from agentpool.vocabulary import ErrorReason
from tests.core_cases import LIMITED, MODEL, config, core_of, queued, result, task

# --- shares under contention ----------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    weights=st.lists(st.sampled_from([1.0, 2.0, 3.0, 5.0]), min_size=2, max_size=4),
    slots=st.integers(1, 3),
    rounds=st.integers(20, 200),
)
def test_shares_follow_the_weights_while_every_tenant_is_backlogged(
    weights: list[float], slots: int, rounds: int
) -> None:
    """Equal tasks, every tenant always backlogged: each dispatch goes to the tenant with the
    least weighted service, so after any number of tasks no tenant is more than one task of
    its own ahead of another's weighted share."""
    names = [f"t{i}" for i in range(len(weights))]
    core = core_of(config(tenants={n: TenantPolicy(weight=w) for n, w in zip(names, weights, strict=True)}), 1, slots)
    served: Counter[str] = Counter()
    running: list[Ticket[str]] = []
    n = 0
    for _ in range(rounds):
        for name in names:
            while core.queue.length(name) <= slots:  # a dispatch cannot empty it
                n += 1
                queued(core, task(name, n))
        for d in core.dispatch(0.0):
            assert isinstance(d, Start)
            served[d.ticket.tenant] += 1
            running.append(d.ticket)
        done = running.pop(0)
        core.finish(done, result(done.task))
    weighted = {name: served[name] / w for name, w in zip(names, weights, strict=True)}
    for name, w in zip(names, weights, strict=True):
        for other in names:
            assert weighted[name] - weighted[other] <= 1 / w + 1e-9, (served, weights)


# --- the whole core, driven at random -------------------------------------------------------

TENANTS = ("a", "b", "c")


class CoreMachine(RuleBasedStateMachine):
    """Random events against the core, with a model of where every task is."""

    def __init__(self) -> None:
        super().__init__()
        self.core: SchedulerCore[str] = core_of(config(max_queued=12), workers=2, slots=2)
        self.now = 0.0
        self.n = 0
        self.tickets: dict[str, Ticket[str]] = {}
        self.queued: set[str] = set()
        self.running: set[str] = set()
        self.ended: set[str] = set()
        self.paused: set[str] = set()
        self.closed: set[int] = set()

    def _apply(self, decisions: list[Start[str] | Drop[str]]) -> None:
        for d in decisions:
            item = d.ticket.item
            assert item in self.queued
            self.queued.discard(item)
            if isinstance(d, Start):
                assert d.waited_s <= d.ticket.max_wait_s
                assert d.worker not in self.closed
                self.running.add(item)
            else:
                self._ended_by(d)

    def _ended_by(self, d: Drop[str]) -> None:
        assert d.reason in (ErrorReason.QUEUE_TIMEOUT, ErrorReason.EVICTED)
        assert d.retry_after_s > 0 and d.message
        assert d.ticket.place is Place.OUT
        self.ended.add(d.ticket.item)

    @rule(
        tenant=st.sampled_from(TENANTS),
        priority=st.sampled_from(["critical", "standard", "sheddable"]),
        deadline=st.none() | st.floats(0.5, 20.0),
        limited=st.booleans(),
    )
    def arrive(self, tenant: str, priority: str, deadline: float | None, limited: bool) -> None:
        self.n += 1
        t = task(tenant, self.n, priority=priority, deadline_s=deadline, model=LIMITED if limited else MODEL)
        ticket = self.core.ticket(t.task_id, t)
        verdict = self.core.admit(ticket, self.now)
        if isinstance(verdict, Reject):
            assert isinstance(verdict.reason, ErrorReason) and verdict.message
            assert 0 < verdict.retry_after_s <= MAX_RETRY_S, verdict
            assert (verdict.reason is ErrorReason.DRAINING) == (self.core.draining is not None)
            self.ended.add(t.task_id)
            return
        assert self.core.draining is None  # a draining core admits nothing
        for evicted in verdict.evicted:
            assert evicted.ticket.item in self.queued
            self.queued.discard(evicted.ticket.item)
            self._ended_by(evicted)
        before = self.core.waiting + len(verdict.evicted)
        self.tickets[t.task_id] = ticket
        self.core.enqueue(ticket, self.now)
        self.queued.add(t.task_id)
        # The bound holds for admissions (work queued again after its worker died may pass it).
        assert self.core.waiting <= max(self.core.config.max_queued, before)

    @rule()
    def dispatch(self) -> None:
        before = Counter(self.tickets[i].limit_key for i in self.running)
        before_running = set(self.running)
        self._apply(self.core.dispatch(self.now))
        after = Counter(self.tickets[i].limit_key for i in self.running)
        capacity = self.core.models.capacity[LIMITED]
        if LIMITED in self.core.models._backlogged and capacity.cap() is not None:
            assert after[LIMITED] <= max(before[LIMITED], capacity.cap() or 0)
        # Work-conserving: what still waits has no free slot, or no tenant or model room.
        core = self.core
        free = any(
            core.slots.open[i] and core.slots.load[i] < core.slots.slots_per_worker for i in range(len(core.slots.load))
        )
        if core.draining is not None:  # a draining core starts nothing
            assert self.running <= set(before_running)
        elif free:
            assert all(not core._eligible(tenant, t) for tenant, t in core.queue.heads())

    @precondition(lambda self: bool(self.running))
    @rule(data=st.data(), how=st.sampled_from(["result", "died", "paused"]), run_s=st.floats(0.0, 5.0))
    def finish(self, data: st.DataObject, how: str, run_s: float) -> None:
        item = data.draw(st.sampled_from(sorted(self.running)))
        ticket = self.tickets[item]
        self.running.discard(item)
        if how == "result":
            self.core.finish(ticket, result(ticket.task, output_tokens=data.draw(st.integers(0, 400))), run_s)
            self.ended.add(item)
        elif how == "died":  # run again elsewhere, first
            self.core.finish(ticket)
            self.core.enqueue(ticket, self.now, resumed=True)
            self.queued.add(item)
        else:
            self.core.finish(ticket)
            self.paused.add(item)

    @precondition(lambda self: bool(self.paused))
    @rule(data=st.data())
    def approve(self, data: st.DataObject) -> None:
        item = data.draw(st.sampled_from(sorted(self.paused)))
        self.paused.discard(item)
        self.core.enqueue(self.tickets[item], self.now, resumed=True)
        self.queued.add(item)

    @precondition(lambda self: bool(self.queued))
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        item = data.draw(st.sampled_from(sorted(self.queued)))
        assert self.core.remove(self.tickets[item]) is True
        self.queued.discard(item)
        self.ended.add(item)

    @rule(dt=st.floats(0.0, 3.0))
    def tick(self, dt: float) -> None:
        self.now += dt
        for d in self.core.tick(self.now):
            assert d.ticket.item in self.queued
            self.queued.discard(d.ticket.item)
            self._ended_by(d)

    @rule(grace=st.floats(0.0, 30.0))
    def drain(self, grace: float) -> None:
        self.core.drain(self.now, grace)

    @rule()
    def undrain(self) -> None:
        self.core.undrain()

    @rule(waiting=st.booleans())
    def limiter(self, waiting: bool) -> None:
        self.core.limiter_backlog(LimiterBacklog({LIMITED: 2} if waiting else {}))

    @rule()
    def add_worker(self) -> None:
        index = self.core.slots.add()
        self.closed.discard(index)

    @precondition(lambda self: self.core.slots.open_count > 1)
    @rule(data=st.data())
    def close_worker(self, data: st.DataObject) -> None:
        index = data.draw(st.sampled_from(self.core.slots.drain_order()))
        self.core.slots.close(index)
        self.closed.add(index)

    @precondition(lambda self: any(not self.core.slots.load[i] for i in self.closed))
    @rule()
    def retire_worker(self) -> None:
        index = min(i for i in self.closed if not self.core.slots.load[i])
        self.core.slots.retire(index)
        self.closed.discard(index)

    @invariant()
    def every_task_is_in_exactly_one_place(self) -> None:
        places = (self.queued, self.running, self.ended, self.paused)
        for i, one in enumerate(places):
            for other in places[i + 1 :]:
                assert not one & other
        assert set(self.tickets) <= set().union(*places)
        in_queue = {t.item for _, _, t in self.core.queue.items()}
        assert in_queue == self.queued
        for item in self.queued:
            assert self.tickets[item].place is Place.QUEUED
        for item in self.running:
            assert self.tickets[item].place is Place.RUNNING and self.tickets[item].worker is not None
        for item in (self.ended | self.paused) & set(self.tickets):
            assert self.tickets[item].place is Place.OUT and self.tickets[item].worker is None

    @invariant()
    def no_cap_is_exceeded(self) -> None:
        core = self.core
        assert all(load <= core.slots.slots_per_worker for load in core.slots.load)
        assert core.slots.in_flight == len(self.running)
        per_tenant = Counter(self.tickets[i].tenant for i in self.running)
        assert core.running == per_tenant
        for tenant, count in per_tenant.items():
            cap = core.config.tenants[tenant].max_concurrency
            assert cap is None or count <= cap
        assert core.waiting == len(self.queued)


test_core_machine = CoreMachine.TestCase
test_core_machine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
