"""The scheduler's pure core (`agentpool.scheduler.core`): each decision pinned on a small
example. `test_core_values.py` pins the values it computes, `test_core_machine.py` drives it at
random; `test_fair_heap.py` checks the fair queue's heap."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from agentpool.config import AdmissionConfig
from agentpool.errors import Draining, Overloaded
from agentpool.models import TenantPolicy
from agentpool.scheduler.capacity import LimiterBacklog
from agentpool.scheduler.core import (
    DEFAULT_RULES,
    DRAIN_RETRY_EXTRA_S,
    MAX_COSTED_TENANTS,
    MAX_RETRY_S,
    MIN_RETRY_S,
    UNKNOWN_WAIT_RETRY_S,
    Admit,
    Drop,
    Place,
    QueueBound,
    RefuseWhileDraining,
    Reject,
    SchedulerCore,
    ShedOnOverload,
    Start,
    Ticket,
    WaitWithinDeadline,
)
from agentpool.scheduler.dispatch import LeastLoaded
from agentpool.scheduler.shedding import WaitForecast
from agentpool.vocabulary import ErrorReason
from tests.core_cases import LIMITED, MODEL, arrive, config, core_of, queued, result, starts, task

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
    ok = arrive(core, task(n=1, deadline_s=3.0))  # 1 task ahead (itself) at 1/s: 1 s
    assert isinstance(ok, Ticket) and ok.predicted_wait_s == 1.0
    refused = arrive(core, task(n=2, deadline_s=1.5))  # 2 s > 1.5 s
    assert refused == Reject(
        ErrorReason.PREDICTED_WAIT, "predicted queue wait 2.0s exceeds the 1.5s this task may wait", 0.5
    )
    # 2 s on average, within 3 s; but fewer than 2 dispatches come in 3 s one time in five.
    risky = arrive(core, task(n=2, deadline_s=3.0))
    message = "predicted queue wait 2.00s, with a 20% chance of more than the 3.0s this task may wait"
    assert risky == Reject(ErrorReason.PREDICTED_WAIT, message, 2.0)
    # A batch task has no limit: it is admitted with no forecast kept.
    batch = arrive(core, task(n=3))
    assert isinstance(batch, Ticket) and batch.predicted_wait_s is None
    # Another tenant, with nothing queued, shares the pool with one other backlogged tenant.
    other = arrive(core, task("c", 4, deadline_s=10.0))
    assert isinstance(other, Ticket) and other.predicted_wait_s == 2.0  # 1 / (1 x 1/2)


def test_a_refusal_is_known_before_admission_and_asking_changes_nothing() -> None:
    core = core_of(config(max_queued=1))
    queued(core, task(n=0))
    core.dispatch(0.0)  # busy: one a second
    queued(core, task(n=1, deadline_s=3.0))
    late = core.ticket("late", task(n=2, deadline_s=1.5))
    before = (len(core.queue), core.waiting, core.slots.in_flight, late.place, late.predicted_wait_s)
    assert core.refusal(late, 0.0) == core.admit(late, 0.0)  # the same verdict, at once
    assert isinstance(core.refusal(late, 0.0), Reject)
    assert (len(core.queue), core.waiting, core.slots.in_flight, late.place) == before[:4]
    # The queue is full: making room is the evicting rule's to decide, at admission.
    critical = core.ticket("c", task("c", 3, priority="critical"))
    assert core.refusal(critical, 0.0) is None and len(core.queue) == 1 and core.waiting == 1
    admitted = core.admit(critical, 0.0)
    assert isinstance(admitted, Admit) and len(admitted.evicted) == 1 and len(core.queue) == 0


def test_a_refusal_asks_every_rule_that_does_not_evict_at_the_time_given() -> None:
    """An evicting rule is passed over, not the end of the question; and the rules judge at
    `now` (the overload is seen at 1.0, not before)."""
    core: SchedulerCore[str] = SchedulerCore(config(), LeastLoaded(1, 1), rules=(QueueBound(), ShedOnOverload()))
    core.detector.observe(2.0, 0.0)
    core.detector.observe(2.0, 1.0)  # a whole interval above target: level 1 at 1.0
    shed = core.ticket("s", task(priority="sheddable"))
    assert core.refusal(shed, 1.0) == Reject(
        ErrorReason.OVERLOAD, "the pool is overloaded: sheddable work is shed until the queue drains", 1.0
    )
    standard = core.ticket("d", task(n=1, deadline_s=30.0))
    assert core.refusal(standard, 1.0) is None  # level 1 sheds sheddable work only
    assert isinstance(core.refusal(standard, 2.0), Reject)  # level 2, an interval later


def test_the_forecast_is_scaled_by_how_far_forecasts_fell_short() -> None:
    core = core_of()
    for i in range(20):
        core.calibration.observe("standard", 1.0, 2.95, float(i) / 100)  # (2.95 + 0.05) / (1 + 0.05)
    queued(core, task(n=0))
    core.dispatch(0.0)
    refused = arrive(core, task(n=1, deadline_s=2.5), now=0.5)
    assert isinstance(refused, Reject)
    assert refused.message == "predicted queue wait 2.9s exceeds the 2.5s this task may wait"
    assert refused.retry_after_s == round(3.0 / 1.05 - 2.5, 3)


def test_each_class_is_scaled_by_how_far_its_own_forecasts_fell_short() -> None:
    # A 10% chance of waiting too long is accepted here (1 s on average at 1/s: 8% past 2.5 s).
    core = core_of(config(admission=AdmissionConfig(late_chance=0.1)))
    for i in range(20):  # sheddable waits ran 2.86x over their forecasts, standard ones did not
        core.calibration.observe("sheddable", 1.0, 2.95, float(i) / 100)
        core.calibration.observe("standard", 1.0, 1.0, float(i) / 100)
    queued(core, task(n=0))
    core.dispatch(0.0)
    refused = arrive(core, task(n=1, deadline_s=2.5, priority="sheddable"), now=0.5)
    assert isinstance(refused, Reject) and refused.message.startswith("predicted queue wait 2.9s")
    admitted = arrive(core, task(n=2, deadline_s=2.5), now=0.5)  # the same forecast, 1 s, unscaled
    assert isinstance(admitted, Ticket) and admitted.predicted_wait_s == 1.0


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
    assert core.limiter_backlog(LimiterBacklog({LIMITED: 3})) is False
    assert len(starts(core.dispatch(1.0))) == 4
    assert core.limiter_backlog(LimiterBacklog({})) is True  # no calls wait: the cap is lifted
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
    assert list(core.calibration.pooled._reports) == [(3.0, (3.0 + 0.05) / (1.0 + 0.05))]


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
    assert [type(r) for r in DEFAULT_RULES] == [RefuseWhileDraining, ShedOnOverload, WaitWithinDeadline, QueueBound]

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


def test_a_queued_tasks_standing_is_its_place_and_the_wait_forecast_from_there() -> None:
    core = core_of()
    first, second, third = (queued(core, task("a", n)) for n in range(3))
    other = queued(core, task("b", 9))
    urgent = queued(core, task("a", 8, priority="critical"))
    whole = core.forecast(urgent)  # the tenant's share of the pool's rate, as admission forecasts it
    assert core.standing(urgent) == (0, WaitForecast(0, whole.share, whole.rate_per_s).seconds())
    places = [core.standing(t) for t in (first, second, third, other)]
    assert [p[0] if p else None for p in places] == [1, 2, 3, 0]  # the critical one goes first
    waits = [p[1] if p else 0.0 for p in places]
    assert waits[0] < waits[1] < waits[2]  # the further back, the longer the forecast wait
    assert waits[2] == WaitForecast(3, whole.share, whole.rate_per_s).seconds()
    core.dispatch(1.0)  # the critical one starts
    assert core.standing(urgent) is None and core.standing(first) is not None
    assert core.standing(first)[0] == 0  # type: ignore[index]


# --- drain -----------------------------------------------------------------------------------


def test_a_draining_core_refuses_every_arrival_and_starts_nothing_until_undrained() -> None:
    core = core_of(workers=1, slots=2)
    running = queued(core, task("a", 1))
    waiting = queued(core, task("a", 2))
    later = queued(core, task("b", 3))
    assert starts(core.dispatch(0.0)) == [("a-1", 0), ("b-3", 0)]
    core.drain(10.0, grace_s=30.0)
    assert core.draining is not None and (core.draining.since, core.draining.until) == (10.0, 40.0)
    for tenant, priority in (("a", "critical"), ("c", "standard"), ("b", "sheddable")):
        verdict = arrive(core, task(tenant, 9, priority=priority), now=12.0)
        assert verdict == Reject(
            ErrorReason.DRAINING,
            "the pool is draining (stopping or being upgraded) and takes no new work",
            28.0 + DRAIN_RETRY_EXTRA_S,
            kind=Draining,
        )
    error = verdict.error("b")  # type: ignore[union-attr]
    assert type(error) is Draining and error.retryable and error.reason is ErrorReason.DRAINING
    assert core.refusal(core.ticket("x", task("a", 10)), 12.0) is not None  # asked before recording too
    core.finish(running, result(running.task), 1.0)  # a slot frees: still nothing starts
    assert core.dispatch(13.0) == [] and waiting.place is Place.QUEUED
    assert core.waiting == 1 and later.place is Place.RUNNING
    core.undrain()
    assert core.draining is None
    assert starts(core.dispatch(14.0)) == [("a-2", 0)]
    assert isinstance(arrive(core, task("c", 11), now=14.0), Ticket)


def test_a_drain_past_its_grace_period_still_hints_a_short_retry() -> None:
    core = core_of()
    core.drain(0.0, grace_s=-5.0)  # a negative grace is none
    assert core.draining is not None and core.draining.until == 0.0
    verdict = arrive(core, task(), now=100.0)
    assert isinstance(verdict, Reject) and verdict.retry_after_s == MIN_RETRY_S


def test_a_draining_core_still_drops_what_waited_past_its_deadline() -> None:
    core = core_of(workers=1, slots=1)
    first = queued(core, task("a", 1))
    core.dispatch(0.0)
    late = queued(core, task("a", 2, deadline_s=4.0))
    core.drain(0.5, grace_s=60.0)
    drops = core.tick(5.0)
    assert [d.ticket for d in drops] == [late] and drops[0].reason is ErrorReason.QUEUE_TIMEOUT
    assert first.place is Place.RUNNING


def test_a_wait_forecast_at_the_deadline_is_judged_by_its_chance_of_lateness() -> None:
    core = core_of()
    queued(core, task(n=0))
    core.dispatch(0.0)  # busy: one a second
    refused = arrive(core, task(n=1, deadline_s=1.0))  # 1 s on average: at the limit, not over
    message = "predicted queue wait 1.00s, with a 37% chance of more than the 1.0s this task may wait"
    assert refused == Reject(ErrorReason.PREDICTED_WAIT, message, 1.0)


def test_the_chance_of_lateness_is_taken_at_the_calibrated_rate() -> None:
    core = core_of()
    for i in range(20):  # waits ran twice their forecasts
        core.calibration.observe("standard", 1.0, 2.05, float(i) / 100)
    queued(core, task(n=0))
    core.dispatch(0.0)
    refused = arrive(core, task(n=1, deadline_s=4.0), now=0.5)  # 2 s calibrated; e^-2 late, not e^-4
    assert isinstance(refused, Reject) and "14% chance" in refused.message


def test_a_chance_of_lateness_at_the_accepted_level_is_admitted() -> None:
    core = core_of(config(admission=AdmissionConfig(late_chance=math.exp(-3.0))))
    queued(core, task(n=0))
    core.dispatch(0.0)
    assert isinstance(arrive(core, task(n=1, deadline_s=3.0)), Ticket)  # late e^-3 of the time
