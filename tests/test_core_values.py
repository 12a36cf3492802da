"""The scheduler's pure core: each value it computes pinned on a hand-computed example
(costs, forecasts, wait limits, the must-queue cases, tick's watch), as the mutation run
asked for."""

from __future__ import annotations

import pytest

from agentpool.config import AdmissionConfig
from agentpool.models import TenantPolicy, Usage
from agentpool.scheduler.capacity import LimiterBacklog
from agentpool.scheduler.core import (
    Drop,
    Place,
    Start,
)
from agentpool.scheduler.shedding import WaitForecast
from agentpool.vocabulary import ErrorReason
from tests.core_cases import LIMITED, config, core_of, queued, result, starts, task


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
    assert list(core.calibration.pooled._reports) == [(7.0, (6.0 + 0.05) / (0.5 + 0.05))]
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
    core.limiter_backlog(LimiterBacklog({LIMITED: 1}))
    core.dispatch(1.0)
    at_cap = queued(core, task("c", 6, model=LIMITED, deadline_s=30.0))
    assert at_cap.predicted_wait_s is not None


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
