"""How many tasks of a rate-limited model may run at once (`ModelDispatch`): the cap while its
calls wait for permits, the cap plus the burst its buckets hold while none waits, and what the
wait forecast learns from the tasks running over it. Exact values, pure."""

from __future__ import annotations

import math

import pytest

from agentpool.models import RateLimit
from agentpool.scheduler.capacity import LimiterBacklog, ModelCapacity, ModelDispatch
from agentpool.scheduler.shedding import WaitForecast
from tests.core_cases import LIMITED, core_of, queued, result, starts, task
from tests.test_permits_exact import broker


def learnt(capacity: ModelCapacity) -> ModelCapacity:
    """Two calls a task, 100 input and 20 output tokens a call, 2 s of run."""
    capacity.observe(calls=2, input_tokens=200, output_tokens=40, run_s=2.0, permit_wait_s=0.0)
    return capacity


def test_the_burst_is_the_scarcest_dimension_over_what_a_task_uses() -> None:
    capacity = learnt(ModelCapacity(RateLimit(rpm=60, itpm=6_000)))
    levels = {"requests": 7.5, "input_tokens": 1_000.0, "output_tokens": 1e6}
    assert capacity.burst(levels) == 3  # 7.5 calls by requests (10 by input), 2 calls a task
    assert capacity.burst({**levels, "input_tokens": 399.0}) == 1  # 3.99 calls
    assert capacity.burst({"requests": -4.0}) == 0  # a bucket in debt grants nothing
    assert capacity.burst({"requests": 1.0}) == 0  # half a task
    assert capacity.burst({"unknown": 0.0}) == math.inf and capacity.burst({}) == math.inf


def test_nothing_is_known_of_a_model_before_its_first_task_ends() -> None:
    assert ModelCapacity(RateLimit(rpm=60)).burst({"requests": 0.0}) == math.inf


def test_a_model_whose_calls_wait_runs_its_cap_and_one_that_holds_a_burst_runs_more() -> None:
    dispatch = ModelDispatch({"m": RateLimit(rpm=60)})
    dispatch.learn("m", result(task(), input_tokens=10, output_tokens=20, calls=1), run_s=2.0)
    cap = dispatch.capacity["m"].cap()
    assert cap == 4  # 1 task/s x 2 s x 1.1, rounded up, plus 1
    for _ in range(6):
        dispatch.started("m")  # nothing reported yet: not capped
    assert dispatch.has_room("m") and dispatch.excess("m") == 0
    assert dispatch.backlog(LimiterBacklog({"m": 2})) is False  # capped at 4, 6 running
    assert not dispatch.has_room("m") and dispatch.excess("m") == 2
    assert dispatch.backlog(LimiterBacklog({}, {"m": {"requests": 2.0}})) is True  # the 6 running + 2
    assert dispatch.has_room("m") and dispatch.excess("m") == 0
    dispatch.started("m")
    dispatch.started("m")
    assert not dispatch.has_room("m")
    assert dispatch.backlog(LimiterBacklog({}, {"m": {"requests": 0.5}})) is False  # empty between calls: 8
    assert not dispatch.has_room("m") and dispatch.excess("m") == 0
    for _ in range(5):
        dispatch.finished("m")
    assert dispatch.backlog(LimiterBacklog({}, {"m": {"requests": 0.5}})) is False  # 3 running: the cap, 4
    assert dispatch.has_room("m")
    dispatch.started("m")
    assert not dispatch.has_room("m")
    assert dispatch.backlog(LimiterBacklog({}, {"other": {"requests": 0.0}})) is True  # unknown: uncapped
    assert dispatch.has_room("m") and dispatch.excess("m") == 0 and dispatch.excess(None) == 0


def test_a_task_that_ends_after_the_report_gives_no_token_back() -> None:
    dispatch = ModelDispatch({"m": RateLimit(rpm=60)})
    dispatch.learn("m", result(task(), input_tokens=10, output_tokens=20, calls=1), run_s=2.0)  # cap 4
    for _ in range(10):
        dispatch.started("m")
    dispatch.backlog(LimiterBacklog({}, {"m": {"requests": 2.0}}))  # room for 2 more: 12
    for _ in range(5):
        dispatch.finished("m")  # 5 running: the buckets still hold 2 tasks' worth, not 7
    assert dispatch.has_room("m") and dispatch.excess("m") == 0
    dispatch.started("m")
    dispatch.started("m")
    assert not dispatch.has_room("m")  # 7 running, both tokens taken
    for _ in range(3):
        dispatch.finished("m")  # 4 running: the cap, whatever the buckets held
    assert not dispatch.has_room("m") and dispatch.excess("m") == 0
    dispatch.finished("m")
    assert dispatch.has_room("m")


def test_the_forecast_counts_the_model_s_excess_first() -> None:
    assert WaitForecast(ahead=1, share=0.5, rate_per_s=2.0, behind=3).seconds() == 3.5  # (3 + 2 / 0.5) / 2
    assert WaitForecast(ahead=0, share=1.0, rate_per_s=0.0, behind=1).seconds() == math.inf
    assert WaitForecast(ahead=0, share=1.0, rate_per_s=0.0).seconds() == 0.0


def test_an_arrival_behind_tasks_waiting_inside_the_workers_is_forecast_to_wait_for_them() -> None:
    core = core_of(workers=1, slots=8)
    first = queued(core, task(n=0, model=LIMITED))
    core.dispatch(0.0)
    core.finish(first, result(first.task), run_s=2.0)  # 60 rpm: 1 task/s, 2 s each -> cap 4
    for n in range(1, 7):
        queued(core, task(n=n, model=LIMITED))
    assert len(starts(core.dispatch(1.0))) == 6  # nothing reported: not capped
    core.limiter_backlog(LimiterBacklog({LIMITED: 3}))
    forecast = core.forecast(core.ticket("x", task(n=9, model=LIMITED)))
    assert (forecast.behind, forecast.ahead, forecast.share, forecast.rate_per_s) == (2, 0, 1.0, 1.0)
    assert forecast.seconds() == pytest.approx(3.0)
    assert core.standing(queued(core, task(n=10, model=LIMITED)))[1] == pytest.approx(3.0)  # type: ignore[index]


def test_the_broker_reports_what_each_bucket_holds_and_nothing_while_paused() -> None:
    b = broker()
    assert b.levels(0.0) == {
        "sonnet": {"requests": 120.0, "input_tokens": 6000.0, "output_tokens": 3000.0},
        "haiku": {"requests": 60.0},
    }
    lagging = broker(margin_s=0.5)  # half a second of refill is kept for the provider's lag
    assert lagging.levels(0.0)["haiku"] == {"requests": 59.5}
    b.pause("sonnet-4", 10.0)
    assert b.levels(5.0)["sonnet"] == {"requests": 0.0, "input_tokens": 0.0, "output_tokens": 0.0}
    assert b.levels(10.0)["sonnet"]["requests"] == 120.0


def test_the_learnt_service_time_is_a_mean_at_first_then_moves_a_twentieth_per_task() -> None:
    capacity = ModelCapacity(RateLimit(rpm=60))
    for run_s in (1.0, 2.0, 3.0):
        capacity.observe(calls=1, input_tokens=1, output_tokens=1, run_s=run_s, permit_wait_s=0.0)
    assert capacity.snapshot()["service_s"] == 2.0  # the mean of three
    for _ in range(17):
        capacity.observe(calls=1, input_tokens=1, output_tokens=1, run_s=2.0, permit_wait_s=0.0)
    capacity.observe(calls=1, input_tokens=1, output_tokens=1, run_s=4.0, permit_wait_s=0.0)  # the 21st
    assert capacity.snapshot()["service_s"] == pytest.approx(0.95 * 2.0 + 0.05 * 4.0)


def test_output_tokens_can_be_the_scarcest_dimension() -> None:
    capacity = learnt(ModelCapacity(RateLimit(rpm=60, otpm=6_000)))
    assert capacity.burst({"requests": 100.0, "output_tokens": 100.0}) == 2  # 5 calls of 20 tokens, 2 a task


def test_a_key_without_limits_is_never_capped_and_learns_nothing() -> None:
    dispatch = ModelDispatch({"m": RateLimit(rpm=60)})
    dispatch.learn("unlisted", result(task()), run_s=1.0)  # not limited: nothing to learn
    dispatch.started("unlisted")
    assert dispatch.has_room("unlisted") and dispatch.excess("unlisted") == 0
    assert dispatch.tasks_per_s("unlisted") is None and "unlisted" not in dispatch.capacity


def test_new_limits_keep_what_a_kept_model_learnt_and_forget_a_dropped_one() -> None:
    dispatch = ModelDispatch({"m": RateLimit(rpm=60), "gone": RateLimit(rpm=60)})
    dispatch.learn("m", result(task()), run_s=2.0)  # one call a task: 1 task/s
    dispatch.backlog(LimiterBacklog({"m": 1, "gone": 1}))
    dispatch.retune({"m": RateLimit(rpm=120), "new": RateLimit(rpm=60)})
    assert set(dispatch.capacity) == {"m", "new"}
    assert dispatch.tasks_per_s("m") == 2.0 and dispatch.tasks_per_s("new") is None
    assert dispatch.snapshot()["m"]["backlogged"] is True and dispatch.has_room("gone")
    dispatch.backlog(LimiterBacklog({"gone": 1}))
    assert dispatch.snapshot()["m"]["backlogged"] is False
