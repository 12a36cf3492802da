"""The scheduler's pure core (`agentpool.scheduler.core`): each decision pinned on a small
example, fair shares under contention, and a state machine that drives the whole core with
random arrivals, dispatches, ends, cancellations, workers joining and leaving, rate-limited
models and time, checking after every step what must always hold."""

from __future__ import annotations

import math
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from agentpool.config import AdmissionConfig, PoolConfig
from agentpool.errors import Overloaded
from agentpool.models import AgentResult, AgentTask, RateLimit, TenantPolicy, Timings, Usage
from agentpool.scheduler.core import (
    DEFAULT_RULES,
    MAX_COSTED_TENANTS,
    MAX_RETRY_S,
    MIN_RETRY_S,
    UNKNOWN_WAIT_RETRY_S,
    Admit,
    Drop,
    Place,
    QueueBound,
    Reject,
    SchedulerCore,
    ShedOnOverload,
    Start,
    Ticket,
    WaitWithinDeadline,
)
from agentpool.scheduler.dispatch import LeastLoaded
from agentpool.scheduler.fair import MAX_REMEMBERED_TENANTS, FairQueue
from agentpool.scheduler.shedding import WaitForecast
from agentpool.vocabulary import ErrorReason

MODEL = "claude-sonnet-4-5"
LIMITED = "claude-haiku-4-5"
#: A prompt of 40 characters and 20 output tokens: an estimate of 10 + 2 x 20 = 50 VTC units.
PROMPT = "x" * 40


def config(**kw: object) -> PoolConfig:
    base: dict[str, object] = {
        "tenants": {
            "a": TenantPolicy(weight=1.0),
            "b": TenantPolicy(weight=2.0, max_concurrency=1),
            "c": TenantPolicy(weight=1.0),
        },
        "limits": {LIMITED: RateLimit(rpm=60)},
        "admission": AdmissionConfig(target_wait_s=0.5, interval_s=1.0, escalate_intervals=2),
    }
    base.update(kw)
    return PoolConfig.model_validate(base)


def task(tenant: str = "a", n: int = 0, **kw: object) -> AgentTask:
    fields: dict[str, object] = {"tenant": tenant, "prompt": PROMPT, "max_tokens": 20, "model": MODEL}
    fields.update({"fallback_models": [], **kw})
    return AgentTask(task_id=f"{tenant}-{n}", **fields)  # type: ignore[arg-type]


def result(t: AgentTask, *, input_tokens: int = 10, output_tokens: int = 20, calls: int = 1) -> AgentResult:
    return AgentResult(
        task_id=t.task_id,
        tenant=t.tenant,
        status="succeeded",
        usage=Usage(input_tokens=input_tokens, output_tokens=output_tokens),
        iterations=calls,
        llm_attempts=calls,
        timings=Timings(),
    )


def core_of(cfg: PoolConfig | None = None, workers: int = 1, slots: int = 1) -> SchedulerCore[str]:
    return SchedulerCore(cfg or config(), LeastLoaded(workers, slots))


def arrive(core: SchedulerCore[str], t: AgentTask, now: float = 0.0) -> Ticket[str] | Reject:
    """Admits and queues a task, as the shell does; the ticket, or the rejection."""
    ticket = core.ticket(t.task_id, t)
    verdict = core.admit(ticket, now)
    if isinstance(verdict, Reject):
        return verdict
    core.enqueue(ticket, now)
    return ticket


def queued(core: SchedulerCore[str], t: AgentTask, now: float = 0.0) -> Ticket[str]:
    ticket = arrive(core, t, now)
    assert isinstance(ticket, Ticket)
    return ticket


def starts(decisions: list[Start[str] | Drop[str]]) -> list[tuple[str, int]]:
    return [(d.ticket.item, d.worker) for d in decisions if isinstance(d, Start)]


# --- decisions, on small examples ----------------------------------------------------------


def test_a_task_is_admitted_queued_started_and_finished() -> None:
    core = core_of()
    t = task()
    ticket = core.ticket("x", t)
    assert (ticket.place, ticket.limit_key, ticket.tenant) == (Place.NEW, None, "a")
    assert core.admit(ticket, 0.0) == Admit(ticket, ())
    assert ticket.place is Place.NEW  # the shell queues it (or leaves it in Redis)
    core.enqueue(ticket, 1.0)
    assert (ticket.place, ticket.enqueued_at, ticket.estimate, ticket.max_wait_s) == (Place.QUEUED, 1.0, 50.0, math.inf)
    assert core.waiting == len(core.queue) == 1
    decisions = core.dispatch(3.5)
    assert decisions == [Start(ticket, 0, 2.5)]
    assert (ticket.place, ticket.worker, core.running["a"], core.slots.in_flight) == (Place.RUNNING, 0, 1, 1)
    assert core.queue.counters["a"] == 50.0  # charged its estimate at dispatch
    core.finish(ticket, result(t, input_tokens=30), run_s=2.0)
    assert (ticket.place, ticket.worker, core.slots.in_flight) == (Place.OUT, None, 0)
    assert "a" not in core.running
    assert core.queue.counters["a"] == 70.0  # corrected to its real usage: 30 + 2 x 20
    assert core.mean_run_s == pytest.approx(0.9 * 1.0 + 0.1 * 2.0)
    assert core.estimate(task("a")) == 70.0  # the tenant's tasks now cost what they did
    assert core.estimate(task("c")) == 70.0  # and a new tenant's, what anyone's did


def test_a_ticket_names_the_limits_of_its_first_model() -> None:
    core = core_of()
    assert core.ticket("x", task(model=LIMITED)).limit_key == LIMITED
    assert core.ticket("x", task(model=MODEL)).limit_key is None


def test_a_ticket_is_queued_once() -> None:
    core = core_of()
    ticket = queued(core, task())
    with pytest.raises(ValueError, match="queued already"):
        core.enqueue(ticket, 0.0)
    core.dispatch(0.0)
    with pytest.raises(ValueError, match="running already"):
        core.enqueue(ticket, 0.0)


def test_work_that_ran_before_goes_first_and_waits_as_long_as_it_takes() -> None:
    core = core_of(config(admission=AdmissionConfig(max_queue_wait_s=5.0)))
    first = queued(core, task("a", 1))
    core.dispatch(0.0)
    waiting = queued(core, task("a", 2), now=0.0)
    assert waiting.max_wait_s == 5.0
    core.finish(first)  # its worker died: no record
    core.enqueue(first, 1.0, resumed=True)
    assert (first.resumed, first.max_wait_s, first.estimate) == (True, math.inf, 50.0)
    assert first.watched is False
    assert starts(core.dispatch(1.0)) == [("a-1", 0)]
    core.finish(first, result(task("a", 1)))
    assert core.dispatch(100.0) == [
        Drop(waiting, ErrorReason.QUEUE_TIMEOUT, "waited 100.0s, longer than its 5.0s", 2.0)
    ]
    assert waiting.place is Place.OUT and not core.queue


def test_shedding_turns_away_interactive_work_only() -> None:
    core = core_of()
    core.detector.observe(2.0, 0.0)
    core.detector.observe(2.0, 1.0)  # a whole interval above target: level 1
    assert core.detector.level(1.0) == 1
    shed = arrive(core, task(priority="sheddable"), 1.0)
    assert shed == Reject(
        ErrorReason.OVERLOAD, "the pool is overloaded: sheddable work is shed until the queue drains", 1.0
    )
    assert isinstance(arrive(core, task(n=1, deadline_s=30.0), 1.0), Ticket)  # standard: level 2 only
    assert isinstance(arrive(core, task(n=2, priority="sheddable", deadline_s=None), 1.5), Reject)
    batch = arrive(core, task("c", 3), 1.0)
    assert isinstance(batch, Ticket)  # no deadline, not sheddable: a batch, never shed
    assert core.detector.level(2.0) == 2
    assert isinstance(arrive(core, task(n=4, deadline_s=30.0), 2.0), Reject)
    assert isinstance(arrive(core, task("c", 5, priority="critical", deadline_s=30.0), 2.0), Ticket)


def test_an_arrival_that_would_miss_its_deadline_is_refused_at_once() -> None:
    core = core_of()  # one slot, a task takes 1 s: one task a second
    queued(core, task(n=0))
    core.dispatch(0.0)  # busy
    ok = arrive(core, task(n=1, deadline_s=1.5))  # 1 task ahead (itself) at 1/s: 1 s
    assert isinstance(ok, Ticket) and ok.predicted_wait_s == 1.0
    refused = arrive(core, task(n=2, deadline_s=1.5))  # 2 s > 1.5 s
    assert refused == Reject(
        ErrorReason.PREDICTED_WAIT, "predicted queue wait 2.0s exceeds the 1.5s this task may wait", 0.5
    )
    # A batch task has no limit: it is admitted with no forecast kept.
    batch = arrive(core, task(n=3))
    assert isinstance(batch, Ticket) and batch.predicted_wait_s is None
    # Another tenant, with nothing queued, shares the pool with one other backlogged tenant.
    other = arrive(core, task("c", 4, deadline_s=2.0))
    assert isinstance(other, Ticket) and other.predicted_wait_s == 2.0  # 1 / (1 x 1/2)


def test_the_forecast_is_scaled_by_how_far_forecasts_fell_short() -> None:
    core = core_of()
    for i in range(20):
        core.calibration.observe(1.0, 2.95, float(i) / 100)  # (2.95 + 0.05) / (1 + 0.05)
    queued(core, task(n=0))
    core.dispatch(0.0)
    refused = arrive(core, task(n=1, deadline_s=2.5), now=0.5)
    assert isinstance(refused, Reject)
    assert refused.message == "predicted queue wait 2.9s exceeds the 2.5s this task may wait"
    assert refused.retry_after_s == round(3.0 / 1.05 - 2.5, 3)


def test_an_unknown_rate_refuses_deadline_work_with_a_minute_to_wait() -> None:
    core = core_of(config(limits={}))
    core.slots.close(0)  # no open worker: no rate
    first = arrive(core, task(n=0, deadline_s=5.0))
    assert isinstance(first, Ticket) and first.predicted_wait_s == 0.0  # nothing ahead of it
    refused = arrive(core, task(n=1, deadline_s=5.0))
    message = "predicted queue wait infs exceeds the 5.0s this task may wait"
    assert refused == Reject(ErrorReason.PREDICTED_WAIT, message, UNKNOWN_WAIT_RETRY_S)


def test_a_wait_just_over_the_deadline_still_gets_a_retry_hint() -> None:
    core = core_of()
    queued(core, task(n=0))
    core.dispatch(0.0)
    refused = arrive(core, task(n=1, deadline_s=0.9999))  # 1 s predicted
    assert isinstance(refused, Reject) and refused.retry_after_s == MIN_RETRY_S


def test_retry_hints_are_capped_at_an_hour() -> None:
    core = core_of(config(tenants={"a": TenantPolicy(max_concurrency=1)}))
    core.mean_run_s = 10_000.0
    queued(core, task(n=0))
    core.dispatch(0.0)
    refused = arrive(core, task(n=1, deadline_s=1.0))
    assert isinstance(refused, Reject) and refused.retry_after_s == MAX_RETRY_S


def test_a_full_queue_evicts_less_important_work_or_refuses() -> None:
    core = core_of(config(max_queued=3))
    core.slots.close(0)  # nothing runs: everything waits
    low = queued(core, task("a", 0, priority="sheddable"))
    queued(core, task("a", 1))
    queued(core, task("c", 2))
    ticket = core.ticket("c-3", task("c", 3, priority="critical"))
    verdict = core.admit(ticket, 0.0)
    assert verdict == Admit(
        ticket, (Drop(low, ErrorReason.EVICTED, "made room for critical work of another tenant", 1.0),)
    )
    assert low.place is Place.OUT and len(core.queue) == 2
    core.enqueue(ticket, 0.0)
    full = arrive(core, task("c", 4))
    assert isinstance(full, Reject)
    assert (full.reason, full.message, full.retry_after_s) == (
        ErrorReason.QUEUE_FULL,
        "queue is full (3 tasks waiting)",
        UNKNOWN_WAIT_RETRY_S,  # no open worker: no rate to forecast from
    )
    core.slots.reopen(0)
    full = arrive(core, task("c", 5))
    assert isinstance(full, Reject) and full.retry_after_s == 6.0  # c has 2 ahead: 3 at half of 1/s


def test_tasks_waiting_in_redis_count_against_the_bound() -> None:
    core = core_of(config(max_queued=2))
    core.outside = 2
    assert core.waiting == 2
    full = arrive(core, task())
    assert isinstance(full, Reject) and full.reason is ErrorReason.QUEUE_FULL
    assert full.retry_after_s == 1.0  # nothing queued in memory ahead of it: 1 task at 1/s
    core.mean_run_s = 0.001
    full = arrive(core, task(n=1))
    assert isinstance(full, Reject) and full.retry_after_s == 0.1  # at least a tenth of a second


def test_a_tenant_at_its_cap_waits_while_others_run() -> None:
    core = core_of(workers=1, slots=4)
    b1, b2 = queued(core, task("b", 1)), queued(core, task("b", 2))
    queued(core, task("c", 3))
    assert starts(core.dispatch(0.0)) == [("b-1", 0), ("c-3", 0)]  # b's cap is 1
    assert b2.place is Place.QUEUED and core.running == Counter({"b": 1, "c": 1})
    core.finish(b1, result(task("b", 1)))
    assert starts(core.dispatch(1.0)) == [("b-2", 0)]


def test_a_rate_limited_model_is_capped_only_while_its_calls_wait() -> None:
    core = core_of(workers=1, slots=8)
    first = queued(core, task(n=0, model=LIMITED))
    core.dispatch(0.0)
    core.finish(first, result(task(n=0), calls=1), run_s=2.0)  # 60 rpm: 1 task/s, 2 s each -> cap 4
    assert core.models.capacity[LIMITED].cap() == math.ceil(1.0 * 2.0 * 1.1) + 1
    for i in range(1, 7):
        queued(core, task(n=i, model=LIMITED))
    assert core.limiter_backlog({LIMITED: 3}) is False
    assert len(starts(core.dispatch(1.0))) == 4
    assert core.limiter_backlog({}) is True  # no calls wait: the cap is lifted
    assert len(starts(core.dispatch(1.0))) == 2


def test_tick_drops_expired_work_and_watches_the_oldest_interactive_wait() -> None:
    core = core_of(workers=1, slots=1)
    busy = queued(core, task("c", 9))
    core.dispatch(0.0)
    core.mean_run_s = 0.001  # nothing is refused for its forecast here
    old = queued(core, task(n=0, deadline_s=2.0), now=0.0)
    queued(core, task(n=1, deadline_s=60.0), now=0.0)
    queued(core, task(n=2), now=0.0)
    assert core.tick(1.0) == []
    assert core.detector.level(1.0) == 0
    drops = core.tick(2.5)
    assert drops == [Drop(old, ErrorReason.QUEUE_TIMEOUT, "waited 2.5s, longer than its 2.0s", 1.0)]
    assert old.place is Place.OUT and len(core.queue) == 2
    assert core.detector.level(3.0) == 1  # the 60 s task waited above target for a whole interval
    core.finish(busy)
    assert len(starts(core.dispatch(4.0))) == 1
    assert core.tick(5.0) == [] and core.detector.level(5.0) == 0  # nothing interactive waits


def test_a_cancelled_task_leaves_the_queue_once() -> None:
    core = core_of()
    core.slots.close(0)
    ticket = queued(core, task())
    assert core.remove(ticket) is True
    assert ticket.place is Place.OUT and core.waiting == 0
    assert core.remove(ticket) is False
    core.finish(ticket)  # giving up a task that is out changes nothing
    assert core.waiting == 0 and core.slots.in_flight == 0


def test_giving_up_a_queued_task_takes_it_out_of_the_queue() -> None:
    core = core_of()
    core.slots.close(0)
    ticket = queued(core, task())
    core.finish(ticket)
    assert ticket.place is Place.OUT and not core.queue


def test_a_forecast_task_reports_its_wait_once() -> None:
    core = core_of()
    first = queued(core, task(n=0))
    core.dispatch(0.0)
    forecast = queued(core, task(n=1, deadline_s=10.0))
    assert forecast.predicted_wait_s == 1.0
    core.finish(first, result(first.task), run_s=1.0)
    assert starts(core.dispatch(3.0)) == [("a-1", 0)]
    assert forecast.predicted_wait_s is None
    assert list(core.calibration._reports) == [(3.0, (3.0 + 0.05) / (1.0 + 0.05))]


def test_costs_are_remembered_for_a_bounded_number_of_tenants() -> None:
    core = core_of(workers=1, slots=1)
    for i in range(MAX_COSTED_TENANTS + 1):
        t = task(f"t{i}")
        ticket = queued(core, t)
        core.dispatch(0.0)
        core.finish(ticket, result(t, input_tokens=10 + i % 2))
    assert core.estimate(task("t0")) == core._costs.pool  # forgotten: estimated from anyone's
    assert "t0" not in core._costs.per_tenant and f"t{MAX_COSTED_TENANTS}" in core._costs.per_tenant
    assert len(core._costs.per_tenant) == MAX_COSTED_TENANTS


def test_a_result_with_no_iteration_teaches_no_cost() -> None:
    core = core_of()
    t = task()
    ticket = queued(core, t)
    core.dispatch(0.0)
    core.finish(ticket, result(t, input_tokens=500, calls=0))
    assert core._costs.per_tenant == {} and core._costs.pool is None
    assert core.queue.counters["a"] == 50.0 + 540.0 - 50.0  # the correction still applies


def test_the_default_rules_and_a_new_one() -> None:
    assert [type(r) for r in DEFAULT_RULES] == [ShedOnOverload, WaitWithinDeadline, QueueBound]

    class NoFridays:
        def __call__(self, core: SchedulerCore[str], ticket: Ticket[str], now: float) -> Reject | None:
            return Reject(ErrorReason.OVERLOAD, "closed", 86_400.0) if ticket.task.tenant == "c" else None

    core: SchedulerCore[str] = SchedulerCore(config(), LeastLoaded(1, 1), rules=(*DEFAULT_RULES, NoFridays()))
    assert arrive(core, task("c")) == Reject(ErrorReason.OVERLOAD, "closed", 86_400.0)
    assert isinstance(arrive(core, task("a")), Ticket)


def test_rejections_and_drops_become_typed_errors() -> None:
    error = Reject(ErrorReason.QUEUE_FULL, "full", 2.5).error("a")
    assert isinstance(error, Overloaded)
    assert (str(error), error.tenant, error.reason, error.retry_after_s) == ("full", "a", ErrorReason.QUEUE_FULL, 2.5)
    ticket = core_of().ticket("x", task("c"))
    dropped = Drop(ticket, ErrorReason.EVICTED, "room", 1.0).error()
    assert (str(dropped), dropped.tenant, dropped.reason, dropped.retry_after_s) == (
        "dropped from the queue: room",
        "c",
        ErrorReason.EVICTED,
        1.0,
    )


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
            self.ended.add(t.task_id)
            return
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
        if free:
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

    @rule(waiting=st.booleans())
    def limiter(self, waiting: bool) -> None:
        self.core.limiter_backlog({LIMITED: 2} if waiting else {})

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


# --- the fair queue's heap against a pass over every tenant ---------------------------------


class _LinearFair:
    """The fair queue as first written (a pass over every backlogged tenant per choice): the
    reference the heap must agree with."""

    def __init__(self, weights: dict[str, float]) -> None:
        self.weights = weights
        self.queues: dict[str, list[int]] = {}
        self.counters: dict[str, float] = {}
        self.last = 0.0

    def push(self, tenant: str, item: int) -> None:
        if tenant not in self.queues:
            floor = min((self.counters[t] for t in self.queues), default=self.last)
            self.counters[tenant] = max(self.counters.get(tenant, 0.0), floor)
            self.queues[tenant] = []
        self.queues[tenant].append(item)

    def head(self, eligible: set[str]) -> tuple[str, int] | None:
        best: tuple[str, int] | None = None
        for tenant, items in self.queues.items():
            if tenant in eligible and (best is None or self.counters[tenant] < self.counters[best[0]]):
                best = (tenant, items[0])
        return best

    def remove(self, tenant: str, item: int) -> None:
        self.queues[tenant].remove(item)
        if not self.queues[tenant]:
            del self.queues[tenant]

    def charge(self, tenant: str, cost: float) -> None:
        current = self.counters.get(tenant, self.last)
        value = current + cost / self.weights[tenant]
        if cost < 0:
            floor = min((self.counters[t] for t in self.queues if t != tenant), default=value)
            value = max(value, min(current, floor))
        self.counters[tenant] = value
        if cost > 0:
            self.last = value


@settings(max_examples=200, deadline=None)
@given(
    steps=st.lists(
        st.tuples(
            st.sampled_from(["push", "pop", "charge", "remove"]),
            st.sampled_from(["a", "b", "c", "d", "e"]),
            st.integers(-60, 120),
            st.frozensets(st.sampled_from(["a", "b", "c", "d", "e"])),
        ),
        max_size=120,
    )
)
def test_the_heap_chooses_as_a_pass_over_every_tenant_would(steps: list[tuple[str, str, int, frozenset[str]]]) -> None:
    weights = {"a": 1.0, "b": 2.0, "c": 0.5, "d": 1.0, "e": 3.0}
    fair: FairQueue[int] = FairQueue(weights.__getitem__)
    reference = _LinearFair(weights)
    n = 0
    for op, tenant, amount, eligible in steps:
        if op == "push":
            n += 1
            fair.push(tenant, "standard", n)
            reference.push(tenant, n)
        elif op == "pop":
            chosen = fair.pop(lambda t, _, allowed=eligible: t in allowed)
            assert chosen == reference.head(set(eligible))
            if chosen is not None:
                reference.remove(*chosen)
        elif op == "charge":
            fair.charge(tenant, float(amount))
            reference.charge(tenant, float(amount))
        elif reference.queues.get(tenant):
            item = reference.queues[tenant][-1]
            assert fair.remove(tenant, item)
            reference.remove(tenant, item)
        assert fair.counters == pytest.approx(reference.counters)
        assert len(fair) == sum(map(len, reference.queues.values()))


# --- what the mutation run asked for: each value the core computes, pinned ------------------


def test_costs_count_cache_tokens_and_average_over_tasks() -> None:
    core = core_of(workers=1, slots=1)
    first = queued(core, task("a", 1))
    core.dispatch(0.0)
    usage = Usage(input_tokens=10, cache_creation_input_tokens=100, cache_read_input_tokens=50, output_tokens=20)
    core.finish(first, result(first.task).model_copy(update={"usage": usage}), run_s=0.5)
    assert core.queue.counters["a"] == 200.0  # 10 + 100 + 50 + 2 x 20, corrected from the 50 charged
    assert (core._costs.per_tenant, core._costs.pool) == ({"a": 200.0}, 200.0)
    second = queued(core, task("a", 2))
    assert second.estimate == 200.0
    core.dispatch(1.0)
    core.finish(second, result(second.task, input_tokens=10, output_tokens=20))  # 50
    assert core._costs.per_tenant == {"a": 0.8 * 200.0 + 0.2 * 50.0}
    assert core._costs.pool == 0.95 * 200.0 + 0.05 * 50.0
    assert core.estimate(task("a")) == 170.0 and core.estimate(task("c")) == 192.5
    assert core.mean_run_s == pytest.approx(0.9 * (0.9 * 1.0 + 0.1 * 0.5))  # run_s defaults to 0


def test_dispatch_at_the_wait_limit_and_past_it() -> None:
    core = core_of(config(admission=AdmissionConfig(max_queue_wait_s=5.0)), workers=1, slots=2)
    late = queued(core, task("a", 1, deadline_s=5.0), now=1.0)
    late.predicted_wait_s = 0.5
    on_time = queued(core, task("c", 2), now=2.0)
    decisions = core.dispatch(7.0)  # a waited 6 s, c exactly 5 s: both looked at in one pass
    assert decisions == [
        Drop(late, ErrorReason.QUEUE_TIMEOUT, "waited 6.0s, longer than its 5.0s", 2.0),
        Start(on_time, 0, 5.0),
    ]
    assert list(core.calibration._reports) == [(7.0, (6.0 + 0.05) / (0.5 + 0.05))]
    third = queued(core, task("c", 3), now=7.5)
    assert starts(core.dispatch(8.0)) == [("c-3", 0)] and third.place is Place.RUNNING
    assert core.rate.per_s(8.0) == 2 / 1.0  # starts at 7.0 and 8.0


def test_work_queued_again_goes_before_critical_work_already_waiting() -> None:
    core = core_of()
    first = queued(core, task("a", 1))
    core.dispatch(0.0)
    queued(core, task("a", 2, priority="critical"))
    core.finish(first)
    core.enqueue(first, 1.0, resumed=True)
    assert starts(core.dispatch(1.0)) == [("a-1", 0)]


def test_forecasts_use_weights_caps_classes_and_model_rates() -> None:
    core = core_of(workers=1, slots=4)
    core.slots.close(0)
    core.slots.add()  # capacity 4 again, on worker 1
    core.mean_run_s = 0.5  # 4 slots / 0.5 s: 8 tasks a second
    queued(core, task("a", 1))
    queued(core, task("b", 2, priority="sheddable"))
    queued(core, task("b", 3))
    # b: weight 2 of 3 backlogged, but its cap of 1 at 0.5 s a task is 2/s of the 8: a quarter.
    assert core.forecast(core.ticket("x", task("b", 4, priority="critical"))) == WaitForecast(0, 0.25, 8.0)
    assert core.forecast(core.ticket("x", task("b", 5))) == WaitForecast(1, 0.25, 8.0)
    assert core.forecast(core.ticket("x", task("b", 6, priority="sheddable"))) == WaitForecast(2, 0.25, 8.0)
    assert core.forecast(core.ticket("x", task("a", 7))) == WaitForecast(1, 1 / 3, 8.0)
    learnt = queued(core, task("c", 8, model=LIMITED))
    core.dispatch(0.0)
    core.finish(learnt, result(learnt.task, calls=1), run_s=0.5)  # 60 rpm: 1 task a second
    forecast = core.forecast(core.ticket("x", task("c", 9, model=LIMITED)))
    assert forecast.rate_per_s == 1.0  # not the 8 the slots allow


def test_unknown_tenants_under_strict_tenants_weigh_one_and_have_no_cap() -> None:
    core = core_of(config(strict_tenants=True))
    assert core.weight("nobody") == 1.0 and core.tenant_has_room("nobody") is True
    assert core.weight("b") == 2.0


def test_a_ticket_takes_the_limits_of_the_first_model_its_tenant_may_use() -> None:
    only_haiku = TenantPolicy(allowed_models=[LIMITED])
    core = core_of(config(tenants={"h": only_haiku}))
    assert core.ticket("x", task("h", fallback_models=[LIMITED])).limit_key == LIMITED  # sonnet not allowed
    assert core.ticket("x", task("h")).limit_key is None  # no model it may use: admission refuses it


def test_tick_measures_waits_from_when_each_task_was_queued() -> None:
    core = core_of(workers=1, slots=1)
    busy = queued(core, task("c", 0))
    core.dispatch(0.0)
    core.mean_run_s = 0.001
    first = queued(core, task("a", 1, deadline_s=2.0), now=10.0)
    queued(core, task("a", 2, deadline_s=60.0), now=10.9)
    assert core.tick(12.0) == []  # waited exactly its 2 s: not past it
    assert core.detector.level(12.0) == 0
    drops = core.tick(12.5)
    assert [d.ticket for d in drops] == [first]
    assert core.tick(13.5) == [] and core.detector.level(13.5) == 1  # the oldest waited 2.6 s, above target
    core.finish(busy)


def test_an_arrival_must_queue_behind_its_tenant_cap_its_model_cap_or_its_own_queue() -> None:
    core = core_of(workers=1, slots=8)
    running = queued(core, task("b", 1))
    core.dispatch(0.0)
    capped = queued(core, task("b", 2, deadline_s=30.0))  # b's cap of 1 is taken; 7 slots free
    assert capped.predicted_wait_s is not None
    free = queued(core, task("c", 3, deadline_s=30.0))  # free slots, nothing of c waiting
    assert free.predicted_wait_s is None
    behind = queued(core, task("c", 4, deadline_s=30.0))  # behind c's own queued task
    assert behind.predicted_wait_s is not None
    core.finish(running)
    learnt = queued(core, task("a", 5, model=LIMITED))
    core.dispatch(0.0)
    core.finish(learnt, result(learnt.task), run_s=1.0)  # cap: 1/s x 1 s x 1.1 + 1 = 3
    for i in range(3):
        queued(core, task("a", 10 + i, model=LIMITED))
    core.limiter_backlog({LIMITED: 1})
    core.dispatch(1.0)
    at_cap = queued(core, task("c", 6, model=LIMITED, deadline_s=30.0))
    assert at_cap.predicted_wait_s is not None


def test_forgetting_idle_tenants_uses_the_backlogged_minimum_not_the_last_served() -> None:
    queue: FairQueue[int] = FairQueue(lambda t: 1.0)
    queue.counters.update({f"idle{i}": float(i) for i in range(MAX_REMEMBERED_TENANTS)})
    queue.push("busy", "standard", 1)
    queue.charge("busy", 5000)
    queue.push("other", "standard", 2)
    queue.charge("elsewhere", 7000)  # not backlogged: the last served is now 7,000
    assert queue.pop() == ("busy", 1)
    assert "idle5000" not in queue.counters and "idle5001" in queue.counters  # floor: other's 5,000


def test_the_heap_sheds_its_stale_entries_and_still_chooses_right() -> None:
    queue: FairQueue[int] = FairQueue(lambda t: 1.0)
    queue.push("a", "standard", 1)
    queue.push("b", "standard", 2)
    for _ in range(300):  # each charge of a backlogged tenant files it again
        queue.charge("a", 1.0)
    assert len(queue._heap) <= 2 * 2 + 64 + 1
    assert queue.pop() == ("b", 2)
    assert queue.pop() == ("a", 1)


def test_a_tenants_share_is_its_weight_over_the_backlogged_weights() -> None:
    core = core_of(workers=1, slots=1)  # b's cap of 1 is the whole pool: its weight decides
    queued(core, task("a", 1))
    assert core.forecast(core.ticket("x", task("b", 2))).share == 2 / 3


def test_tick_watches_the_oldest_interactive_wait_not_the_newest() -> None:
    core = core_of(workers=1, slots=1)
    core.slots.close(0)
    core.slots.add()
    core.mean_run_s = 0.001
    busy = queued(core, task("c", 0))
    core.dispatch(0.0)
    queued(core, task("a", 1, deadline_s=60.0), now=0.0)
    queued(core, task("a", 2, deadline_s=60.0), now=0.9)
    core.tick(1.0)  # the oldest waited 1 s, above the 0.5 s target; the newest 0.1 s
    core.tick(2.0)
    assert core.detector.level(2.0) == 1
    core.finish(busy)
