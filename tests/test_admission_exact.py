"""The admission cores pinned to exact values on hand-computed timelines: buckets, the fair
queue's choices and evictions, overload detection and escalation, wait forecasts, dispatch
rates and per-model dispatch capacity. The property and state-machine tests in
`test_admission_policies.py` say what must always hold; these say what each step gives."""

from __future__ import annotations

import math

import pytest

from agentpool.models import AgentResult, RateLimit, Timings, Usage
from agentpool.scheduler.buckets import BucketSet, TokenBucket
from agentpool.scheduler.capacity import HEADROOM, SPARE, LimiterBacklog, ModelCapacity, ModelDispatch
from agentpool.scheduler.fair import MAX_REMEMBERED_TENANTS, FairQueue, token_cost
from agentpool.scheduler.shedding import DispatchRate, OverloadDetector, WaitForecast

LIMITS = {"requests": 60, "input_tokens": 600, "output_tokens": 600}

# --- token buckets ----------------------------------------------------------------------------


def test_a_bucket_refuses_a_limit_that_is_not_positive() -> None:
    for bad in (0, -1):
        with pytest.raises(ValueError, match=r"^per_minute must be positive$"):
            TokenBucket(bad, 0.0)
    assert TokenBucket(0.5, 0.0).capacity == 0.5


def test_a_bucket_starts_full_or_empty_and_refills_continuously() -> None:
    assert TokenBucket(60, 0.0).level(0.0) == 60.0
    empty = TokenBucket(60, 10.0, full=False)
    assert empty.level(10.0) == 0.0
    assert empty.level(12.5) == pytest.approx(2.5)  # 1 a second
    assert empty.level(200.0) == 60.0


def test_the_provider_lag_margin_is_waited_for() -> None:
    """With a margin of 2 s at 1/s, a request fits only once 2 more than it asks for are there."""
    bucket = TokenBucket(60, 0.0, full=False, margin_s=2.0)
    assert bucket.margin == pytest.approx(2.0)
    assert bucket.wait_s(5, 0.0) == pytest.approx(7.0)
    assert bucket.wait_s(5, 7.0) == 0.0
    assert bucket.wait_s(59, 100.0) == 0.0  # the margin never asks for more than the capacity
    assert TokenBucket(60, 0.0, full=False).wait_s(5, 0.0) == pytest.approx(5.0)


def test_wait_is_zero_not_negative_when_it_fits() -> None:
    bucket = TokenBucket(60, 0.0)
    assert bucket.wait_s(10, 0.0) == 0.0
    assert bucket.wait_s(60, 0.0) == 0.0
    assert bucket.wait_s(1000, 0.0) == 0.0  # clamped to the capacity, which is there


def test_lowering_to_the_provider_s_remaining_never_raises_and_never_goes_negative() -> None:
    bucket = TokenBucket(60, 0.0)
    assert bucket.lower_to(60, 0.0) is False  # equal: nothing to lower
    assert bucket.lower_to(70, 0.0) is False and bucket.level(0.0) == 60.0
    assert bucket.lower_to(20, 0.0) is True and bucket.level(0.0) == 20.0
    assert bucket.lower_to(-5, 0.0) is True and bucket.level(0.0) == 0.0


def test_a_bucket_set_is_built_with_the_fill_and_margin_asked_for() -> None:
    buckets = BucketSet.from_limits(LIMITS, 0.0, full=False, margin_s=3.0)
    assert {dim: b.level(0.0) for dim, b in buckets.buckets.items()} == dict.fromkeys(LIMITS, 0.0)
    assert buckets.buckets["input_tokens"].margin == pytest.approx(30.0)  # 10/s for 3 s
    assert BucketSet.from_limits(LIMITS, 0.0).buckets["requests"].level(0.0) == 60.0


def test_a_dimension_not_asked_for_is_neither_taken_nor_waited_for() -> None:
    buckets = BucketSet.from_limits(LIMITS, 0.0)
    buckets.take({"input_tokens": 600}, 0.0)
    assert buckets.wait_s({"requests": 1}, 0.0) == 0.0
    assert buckets.take({"requests": 1}, 0.0) == {"requests": 1.0, "input_tokens": 0.0, "output_tokens": 0.0}
    assert buckets.buckets["output_tokens"].level(0.0) == 600.0
    assert buckets.granted == {"requests": 1.0, "input_tokens": 600.0, "output_tokens": 0.0}


def test_settling_refunds_what_was_not_used_and_takes_what_was_used_beyond() -> None:
    buckets = BucketSet.from_limits(LIMITS, 0.0)
    reserved = buckets.take({"requests": 1, "input_tokens": 100, "output_tokens": 100}, 0.0)
    buckets.take({"requests": 1, "input_tokens": 10, "output_tokens": 10}, 0.0)
    buckets.settle(reserved, {"input_tokens": 40.5, "output_tokens": 150}, 0.0)
    levels = {dim: b.level(0.0) for dim, b in buckets.buckets.items()}
    assert levels == {"requests": 58.0, "input_tokens": 600 - 110 + 59.5, "output_tokens": 600 - 110 - 50}
    assert buckets.granted == {"requests": 2.0, "input_tokens": 50.5, "output_tokens": 160.0}


def test_settling_a_dimension_missing_on_either_side() -> None:
    buckets = BucketSet.from_limits(LIMITS, 0.0)
    buckets.settle({"requests": 1}, {"input_tokens": 10}, 0.0)  # nothing reserved of it, 10 used
    buckets.settle({"output_tokens": 0.5}, {}, 0.0)  # reserved, no report: stands as reserved
    levels = {dim: b.level(0.0) for dim, b in buckets.buckets.items()}
    assert levels == {"requests": 60.0, "input_tokens": 590.0, "output_tokens": 600.0}
    assert buckets.granted == {"requests": 0.0, "input_tokens": 10.0, "output_tokens": 0.0}
    buckets.take({"output_tokens": 1}, 0.0)
    buckets.settle({"output_tokens": 1}, {"output_tokens": 0.5}, 0.0)  # half a token back
    assert buckets.buckets["output_tokens"].level(0.0) == pytest.approx(599.5)


def test_a_bucket_set_snapshot() -> None:
    buckets = BucketSet.from_limits({"requests": 60, "input_tokens": 600}, 0.0)
    buckets.take({"requests": 1, "input_tokens": 100.12345}, 0.0)
    buckets.pause(12.5)
    assert buckets.snapshot(2.0) == {
        "dimensions": {
            "requests": {"level": 60.0, "capacity": 60.0},
            "input_tokens": {"level": round(600 - 100.12345 + 20, 3), "capacity": 600.0},
        },
        "paused_for_s": 10.5,
        "granted": {"requests": 1.0, "input_tokens": 100.123, "output_tokens": 0.0},
    }
    assert buckets.snapshot(20.0)["paused_for_s"] == 0.0


# --- the fair queue -----------------------------------------------------------------------------


def test_service_counts_output_twice() -> None:
    assert token_cost(10, 5) == 20.0
    assert token_cost(0, 1) == 2.0


def test_a_tie_goes_to_the_tenant_backlogged_longest() -> None:
    queue: FairQueue[str] = FairQueue(lambda t: 1.0)
    queue.push("b", "standard", "b1")
    queue.push("a", "standard", "a1")
    assert queue.counters == {"b": 0.0, "a": 0.0}
    assert queue.head() == ("b", "b1")
    queue.charge("b", 1)
    assert queue.head() == ("a", "a1")


def test_views_of_the_queue() -> None:
    queue: FairQueue[str] = FairQueue({"a": 1.0, "b": 4.0}.__getitem__)
    queue.push("a", "sheddable", "a-s")
    queue.push("a", "critical", "a-c")
    queue.push("a", "standard", "a-t1")
    queue.push("a", "standard", "a-t2")
    queue.push("b", "standard", "b-t")
    assert queue.backlogged() == ["a", "b"]
    assert list(queue.items()) == [
        ("a", "critical", "a-c"),
        ("a", "standard", "a-t1"),
        ("a", "standard", "a-t2"),
        ("a", "sheddable", "a-s"),
        ("b", "standard", "b-t"),
    ]
    assert [queue.length("a", at_least=p) for p in ("critical", "standard", "sheddable")] == [1, 3, 4]
    assert queue.length("a") == 4 and queue.length("nobody") == 0 and queue.length("nobody", at_least="critical") == 0
    assert queue.weighted_length("a") == 4.0 and queue.weighted_length("b") == 0.25
    assert queue.weight("b") == 4.0
    assert queue.heads() == [("a", "a-c"), ("b", "b-t")]
    assert queue.depth() == {"a": {"critical": 1, "standard": 2, "sheddable": 1}, "b": {"standard": 1}}


def test_eviction_takes_the_newest_of_the_least_important_class_from_the_biggest_weighted_holder() -> None:
    weights = {"a": 1.0, "z": 4.0, "new": 1.0}
    queue: FairQueue[str] = FairQueue(weights.__getitem__)
    for i in range(2):
        queue.push("a", "sheddable", f"a{i}")
    for i in range(4):  # more items, but less weighted queue space (4 / 4 < 2 / 1)
        queue.push("z", "sheddable", f"z{i}")
    queue.push("z", "standard", "z-std")
    assert queue.evict_for("new", "standard") == ("a", "a1")
    assert len(queue) == 6 and queue.length("a") == 1
    assert queue.evict_for("new", "critical") == ("z", "z3")  # sheddable before standard


def test_a_critical_arrival_may_evict_standard_work_when_no_sheddable_is_queued() -> None:
    queue: FairQueue[str] = FairQueue({"a": 1.0, "b": 1.0}.__getitem__)
    queue.push("a", "standard", "a0")
    queue.push("a", "standard", "a1")
    queue.push("a", "critical", "a-c")
    assert queue.evict_for("b", "critical") == ("a", "a1")
    assert queue.evict_for("b", "sheddable") is None  # nothing below sheddable; a holds no sheddable


def test_eviction_within_a_class_needs_a_holder_with_more_weighted_space_than_the_arrival_would_have() -> None:
    weights = {"hog": 1.0, "me": 1.0, "heavy": 4.0}
    queue: FairQueue[str] = FairQueue(weights.__getitem__)
    queue.push("hog", "standard", "h0")
    assert queue.evict_for("me", "standard") is None  # 1 item against my 1 after arriving: a tie keeps it
    queue.push("hog", "standard", "h1")
    assert queue.evict_for("me", "standard") == ("hog", "h1")  # 2 > 1
    queue.push("hog", "standard", "h1")
    for i in range(3):  # 3 items at weight 4 hold 0.75 each... plus the arrival: 4 / 4 = 1 < 2
        queue.push("heavy", "standard", f"x{i}")
    assert queue.evict_for("heavy", "standard") == ("hog", "h1")


def test_no_eviction_from_oneself_from_an_empty_queue_or_of_a_class_the_holder_lacks() -> None:
    queue: FairQueue[str] = FairQueue(lambda t: 1.0)
    assert queue.evict_for("me", "standard") is None
    for i in range(3):
        queue.push("me", "standard", f"m{i}")
    assert queue.evict_for("me", "standard") is None
    queue.push("hog", "critical", "c0")
    queue.push("hog", "critical", "c1")
    queue.push("hog", "critical", "c2")
    queue.push("hog", "critical", "c3")
    assert queue.evict_for("other", "standard") is None  # the hog holds only more important work


# --- overload detection and forecasts -----------------------------------------------------------


def test_overload_is_declared_after_one_whole_interval_above_target_and_escalates_on_time() -> None:
    detector = OverloadDetector(target_s=0.5, interval_s=1.0, escalate_intervals=3)
    detector.observe(0.6, 10.0)
    assert detector.level(10.0) == 0
    detector.observe(0.5, 10.999)  # at the target is not below it
    assert detector.level(10.999) == 0
    detector.observe(0.6, 11.0)
    assert detector.level(11.0) == 1
    detector.observe(0.9, 12.5)  # more waits above target do not restart the escalation clock
    assert detector.level(12.999) == 1
    assert detector.level(13.0) == 2  # 11 + (3 - 1) intervals
    detector.observe(0.4, 13.5)
    assert detector.level(13.5) == 0


def test_escalation_after_other_numbers_of_intervals() -> None:
    for intervals, second_level_at in ((2, 12.0), (4, 14.0)):
        detector = OverloadDetector(target_s=0.5, interval_s=1.0, escalate_intervals=intervals)
        detector.observe(1.0, 10.0)
        detector.observe(1.0, 11.0)
        assert detector.level(second_level_at - 0.001) == 1
        assert detector.level(second_level_at) == 2
    at_once = OverloadDetector(target_s=0.5, interval_s=1.0, escalate_intervals=1)
    at_once.observe(1.0, 10.0)
    at_once.observe(1.0, 11.0)
    assert at_once.level(11.0) == 2


def test_an_empty_queue_clears_overload_and_the_next_standing_queue_needs_a_whole_interval() -> None:
    detector = OverloadDetector(target_s=0.5, interval_s=2.0, escalate_intervals=3)
    detector.observe(1.0, 0.0)
    detector.observe(1.0, 2.0)
    assert detector.level(2.0) == 1
    detector.idle()
    assert detector.level(2.0) == 0
    detector.observe(1.0, 3.0)
    detector.observe(1.0, 4.9)
    assert detector.level(4.9) == 0
    detector.observe(1.0, 5.0)
    assert detector.level(5.0) == 1


@pytest.mark.parametrize(
    ("ahead", "share", "rate", "seconds"),
    [
        (1, 1.0, 0.5, 4.0),
        (3, 0.5, 2.0, 4.0),
        (0, 1.0, 4.0, 0.25),
        (1, 0.0, 2.0, math.inf),
        (0, 0.0, 2.0, 0.0),
        (1, 1.0, 0.0, math.inf),
        (0, 1.0, 0.0, 0.0),
    ],
)
def test_wait_forecasts(ahead: int, share: float, rate: float, seconds: float) -> None:
    assert WaitForecast(ahead=ahead, share=share, rate_per_s=rate).seconds() == seconds


def test_the_dispatch_rate_over_its_window() -> None:
    rate = DispatchRate(window_s=10.0)
    assert rate.per_s(0.0) == 0.0
    rate.record(0.0)
    assert rate.per_s(0.0) == 0.0  # one start is no rate
    for t in (1.0, 2.0, 3.0):
        rate.record(t)
    assert rate.per_s(3.0) == pytest.approx(4 / 3)
    assert rate.per_s(12.0) == pytest.approx(2 / 10)  # 0 and 1 have left; 2 is exactly 10 s old and stays
    assert rate.per_s(13.5) == 0.0  # only 3 is left
    burst = DispatchRate()
    burst.record(5.0)
    burst.record(5.0)
    assert burst.per_s(5.0) == pytest.approx(2000.0)  # two at once: a millisecond span at least


def test_the_dispatch_rate_keeps_at_most_its_events() -> None:
    rate = DispatchRate(window_s=100.0, max_events=3)
    for t in range(6):
        rate.record(float(t))
    assert rate.per_s(5.0) == pytest.approx(3 / 2)


# --- dispatch capacity per rate-limited model ---------------------------------------------------


def test_capacity_learns_by_moving_average_and_snapshots_rounded() -> None:
    capacity = ModelCapacity(RateLimit(rpm=600))
    assert capacity.snapshot() == {"tasks_per_s": None, "service_s": None, "cap": None}
    capacity.observe(calls=0, input_tokens=0, output_tokens=0, run_s=5.0, permit_wait_s=0.0)  # no call: ignored
    assert capacity.tasks_per_s() is None
    capacity.observe(calls=3, input_tokens=30, output_tokens=3, run_s=1.0, permit_wait_s=0.0)
    capacity.observe(calls=3, input_tokens=30, output_tokens=3, run_s=2.5, permit_wait_s=0.5)
    rate = 10 / 3
    assert capacity.snapshot() == {
        "tasks_per_s": round(rate, 3),
        "service_s": 1.5,  # the mean of the first samples: (1.0 + 2.0) / 2
        "cap": math.ceil(rate * 1.5 * HEADROOM) + SPARE,
    }


def test_tokens_per_call_bind_the_rate_and_never_count_below_one() -> None:
    inputs = ModelCapacity(RateLimit(itpm=60_000))
    inputs.observe(calls=2, input_tokens=400, output_tokens=0, run_s=1.0, permit_wait_s=0.0)
    assert inputs.tasks_per_s() == pytest.approx(1000 / 200 / 2)
    outputs = ModelCapacity(RateLimit(otpm=6_000))
    outputs.observe(calls=2, input_tokens=0, output_tokens=100, run_s=1.0, permit_wait_s=0.0)
    assert outputs.tasks_per_s() == pytest.approx(100 / 50 / 2)
    for limit in (RateLimit(itpm=600), RateLimit(otpm=600)):
        tiny = ModelCapacity(limit)
        tiny.observe(calls=2, input_tokens=1, output_tokens=1, run_s=1.0, permit_wait_s=0.0)
        assert tiny.tasks_per_s() == pytest.approx(10 / 1 / 2)  # half a token a call counts as one
        none = ModelCapacity(limit)
        none.observe(calls=1, input_tokens=0, output_tokens=0, run_s=1.0, permit_wait_s=0.0)
        assert none.tasks_per_s() == pytest.approx(10.0)


def test_a_limit_with_no_dimension_never_caps() -> None:
    capacity = ModelCapacity(RateLimit())
    capacity.observe(calls=1, input_tokens=10, output_tokens=10, run_s=1.0, permit_wait_s=0.0)
    assert capacity.tasks_per_s() is None and capacity.cap() is None


def _result(
    calls: int, input_tokens: int, cache_creation: int, output_tokens: int, permit_wait_ms: float
) -> AgentResult:
    usage = Usage(input_tokens=input_tokens, cache_creation_input_tokens=cache_creation, output_tokens=output_tokens)
    return AgentResult(
        task_id="t",
        tenant="acme",
        status="succeeded",
        usage=usage,
        llm_attempts=calls,
        timings=Timings(permit_wait_ms=permit_wait_ms),
    )


def test_model_dispatch_caps_a_key_only_while_its_calls_wait_for_permits() -> None:
    dispatch = ModelDispatch({"m": RateLimit(rpm=60, itpm=6_000), "other": RateLimit(rpm=60)})
    assert bool(dispatch) and not ModelDispatch({})
    assert dispatch.has_room(None) and dispatch.tasks_per_s(None) is None
    assert dispatch.backlog(LimiterBacklog({"m": 2})) is False
    assert dispatch.has_room("m")  # backlogged, but nothing learnt yet: no cap
    # One call a task, 50 + 50 input tokens a call (cache writes count), 2 s of run of which 1 s waiting.
    dispatch.learn("m", _result(1, 50, 50, 10, 1000.0), run_s=2.0)
    dispatch.learn(None, _result(1, 1, 1, 1, 0.0), run_s=99.0)
    assert dispatch.tasks_per_s("m") == pytest.approx(1.0)  # rpm 60 and itpm 6000 / 100 both give 1/s
    cap = math.ceil(1.0 * 1.0 * HEADROOM) + SPARE
    assert cap == 3
    for _ in range(cap):
        assert dispatch.has_room("m")
        dispatch.started("m")
    assert not dispatch.has_room("m")
    assert dispatch.has_room("other")
    dispatch.started(None)
    dispatch.finished(None)
    assert dispatch.snapshot() == {
        "m": {"tasks_per_s": 1.0, "service_s": 1.0, "cap": 3, "running": 3, "backlogged": True},
        "other": {"tasks_per_s": None, "service_s": None, "cap": None, "running": 0, "backlogged": False},
    }
    dispatch.finished("m")
    assert dispatch.has_room("m")
    dispatch.started("m")
    assert dispatch.backlog(LimiterBacklog({"m": 0, "other": 1})) is True  # m stopped waiting: freed
    assert dispatch.has_room("m")
    assert dispatch.backlog(LimiterBacklog({"other": 1})) is False


# --- what the first pass of mutation testing left -----------------------------------------------


def test_a_pause_is_reported_to_the_millisecond() -> None:
    buckets = BucketSet.from_limits({"requests": 60}, 0.0)
    buckets.pause(12.34567)
    assert buckets.snapshot(0.0)["paused_for_s"] == 12.346


def _full_memory() -> FairQueue[int]:
    """A queue remembering as many idle tenants as it may (counters 0 .. 9,999), with `busy`
    (served 5,000) and `other` (lifted to it) backlogged."""
    queue: FairQueue[int] = FairQueue(lambda t: 1.0)
    queue.counters.update({f"idle{i}": float(i) for i in range(MAX_REMEMBERED_TENANTS)})
    queue.push("busy", "standard", 1)
    queue.charge("busy", 5000)
    queue.push("other", "standard", 2)
    return queue


def test_idle_tenants_are_forgotten_beyond_the_limit_only_at_or_below_the_backlogged_minimum() -> None:
    queue = _full_memory()
    assert queue.counters["other"] == 5000.0  # lifted to the backlogged minimum
    assert queue.pop() == ("busy", 1)  # a tie: busy waited longer; now idle, 10,002 remembered
    assert "busy" not in queue.counters and "idle5000" not in queue.counters  # at the floor: gone
    assert "idle5001" in queue.counters and queue.counters["other"] == 5000.0
    assert len(queue.counters) == 4999 + 1


def test_forgetting_idle_tenants_uses_the_backlogged_minimum_not_the_last_served() -> None:
    queue = _full_memory()
    queue.charge("elsewhere", 7000)  # not backlogged: the last served is now 7,000
    assert queue.pop() == ("busy", 1)
    assert "idle5000" not in queue.counters and "idle5001" in queue.counters  # floor: other's 5,000


def test_nobody_is_forgotten_at_the_limit_and_with_no_backlog_the_floor_is_the_last_served() -> None:
    queue: FairQueue[int] = FairQueue(lambda t: 1.0)
    queue.counters.update({f"idle{i}": float(i) for i in range(MAX_REMEMBERED_TENANTS - 1)})
    queue.push("busy", "standard", 1)
    queue.pop()
    assert len(queue.counters) == MAX_REMEMBERED_TENANTS  # exactly at the limit: kept
    queue.charge("busy", 100)  # the last served counter is now 100
    queue.push("late", "standard", 2)
    assert queue.counters["late"] == 100.0
    queue.pop()
    assert sorted(queue.counters, key=queue.counters.__getitem__)[:1] == ["idle101"]
    assert set(queue.counters) == {f"idle{i}" for i in range(101, MAX_REMEMBERED_TENANTS - 1)}


def test_a_tenant_back_from_idle_keeps_a_counter_above_the_floor() -> None:
    queue: FairQueue[int] = FairQueue(lambda t: 1.0)
    queue.push("heavy", "standard", 1)
    queue.pop()
    queue.charge("heavy", 900)
    queue.push("light", "standard", 2)
    queue.charge("light", 100)  # light: 900 + 100
    queue.pop()
    queue.push("light", "standard", 3)
    queue.push("x", "standard", 4)
    queue.charge("x", -1000)  # x: lifted to 1000, a refund may not take it below light
    assert queue.counters["x"] == 1000.0
    queue.push("heavy", "standard", 5)  # heavy's own 900 is below the floor of 1000: lifted
    assert queue.counters["heavy"] == 1000.0
    queue.charge("heavy", 500)
    queue.pop(lambda t, item: t == "heavy")
    queue.push("heavy", "standard", 6)  # back with 1500, above the floor: kept
    assert queue.counters["heavy"] == 1500.0


def test_charges_move_the_last_served_counter_new_tenants_start_from() -> None:
    queue: FairQueue[int] = FairQueue(lambda t: 1.0)
    queue.charge("unseen", 7)  # a tenant never seen starts from the last served counter (0)
    assert queue.counters["unseen"] == 7.0
    queue.charge("a", 100)  # a: 7 + 100
    queue.charge("unseen", 0.5)  # the last served counter follows it down to 7.5
    queue.push("new", "standard", 1)
    assert queue.counters["new"] == 7.5
    queue.charge("unseen", 0)  # no service, no move
    queue.charge("a", 0)
    queue.remove("new", 1)
    queue.push("newer", "standard", 2)
    assert queue.counters["newer"] == 7.5


def test_pop_respects_eligibility_push_front_and_remove_says_what_it_did() -> None:
    queue: FairQueue[str] = FairQueue({"a": 1.0, "b": 1.0}.__getitem__)
    assert queue.evict_for("a", "standard") is None  # empty: no holder is even weighed
    queue.push("a", "standard", "a1")
    queue.push("b", "standard", "b1")
    queue.push("b", "standard", "b0", front=True)
    assert queue.pop(lambda tenant, item: tenant == "b") == ("b", "b0")
    assert queue.pop(lambda tenant, item: False) is None
    assert queue.remove("a", "a1") is True
    assert queue.remove("a", "a1") is False
    assert queue.remove("b", "nothing") is False
    assert queue.remove("b", "b1") is True and len(queue) == 0


def test_the_default_dispatch_rate_window_and_size() -> None:
    rate = DispatchRate()
    rate.record(0.0)
    rate.record(5.0)
    assert rate.per_s(10.0) == pytest.approx(2 / 10)
    assert rate.per_s(10.5) == 0.0  # 10 s window: 0 has left
    full = DispatchRate()
    full.record(0.0)
    for _ in range(100_000):
        full.record(1.0)
    assert full.per_s(1.0) == pytest.approx(100_000 / 1e-3)  # 100,000 kept: the one at 0 is out


def test_capacity_rounds_the_service_time_to_a_tenth_of_a_millisecond() -> None:
    capacity = ModelCapacity(RateLimit(rpm=60))
    capacity.observe(calls=1, input_tokens=1, output_tokens=1, run_s=1.234567, permit_wait_s=0.0)
    assert capacity.snapshot()["service_s"] == 1.2346


def test_model_dispatch_counts_cache_writes_as_input_and_each_end_once() -> None:
    dispatch = ModelDispatch({"m": RateLimit(rpm=60, itpm=3_000)})
    dispatch.learn("m", _result(1, 50, 50, 10, 0.0), run_s=1.0)
    assert dispatch.tasks_per_s("m") == pytest.approx(0.5)  # 50 input tokens/s, 100 a task
    for _ in range(3):
        dispatch.started("m")
    dispatch.finished("m")
    assert dispatch.snapshot()["m"]["running"] == 2
