"""The shedding rules' pure logic, driven with an injected clock: the overload detector,
which work may be shed, the wait forecast and its calibration. No Ray, no Redis, no sleeping."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agentpool.scheduler.fair import PRIORITIES
from agentpool.scheduler.shedding import (
    EXACT_TERMS,
    ClassCalibration,
    OverloadDetector,
    WaitCalibration,
    WaitForecast,
    interactive,
    poisson_below,
    sheds,
)


@given(waits=st.lists(st.tuples(st.floats(0, 2), st.floats(0, 0.5)), min_size=1, max_size=100))
def test_overload_needs_a_whole_interval_above_target(waits: list[tuple[float, float]]) -> None:
    detector = OverloadDetector(target_s=0.5, interval_s=1.0, escalate_intervals=3)
    now, last_below = 0.0, 0.0
    for wait, dt in waits:
        now += dt
        detector.observe(wait, now)
        if wait < 0.5:
            last_below = now
            assert detector.level(now) == 0
        if detector.level(now) >= 1:
            assert now - last_below >= 1.0 - 1e-9
        if detector.level(now) == 2:
            assert now - last_below >= 3.0 - 1e-9


def test_shedding_order_and_forecast() -> None:
    assert [p for p in PRIORITIES if sheds(p, 0, 30.0)] == []
    assert [p for p in PRIORITIES if sheds(p, 1, 30.0)] == ["sheddable"]
    assert [p for p in PRIORITIES if sheds(p, 2, 30.0)] == ["standard", "sheddable"]
    # Without a deadline only `sheddable` work is interactive: a batch is never shed.
    assert [p for p in PRIORITIES if interactive(p, None)] == ["sheddable"]
    assert [p for p in PRIORITIES if interactive(p, 0.5)] == list(PRIORITIES)
    assert [p for p in PRIORITIES if sheds(p, 1, None)] == ["sheddable"]
    assert [p for p in PRIORITIES if sheds(p, 2, None)] == ["sheddable"]
    assert [p for p in PRIORITIES if sheds(p, 0, None)] == []
    # 9 ahead of it, 100 tasks/s, a fifth of the pool: (9 + 1) / 20 per s
    assert WaitForecast(ahead=9, share=0.2, rate_per_s=100).seconds() == pytest.approx(0.5)
    assert WaitForecast(ahead=0, share=1.0, rate_per_s=0).seconds() == 0


# --- the forecast's calibration ---------------------------------------------------------


def _nearest_rank(values: list[float], q: float) -> float:
    """The q-quantile by the nearest-rank rule, written from its definition."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[rank - 1]


def test_wait_calibration_is_one_until_it_has_seen_enough() -> None:
    calibration = WaitCalibration(min_samples=3, slack_s=0.0)
    assert calibration.factor(0.0) == 1.0
    calibration.observe(1.0, 4.0, 0.0)
    calibration.observe(1.0, 4.0, 0.0)
    assert calibration.factor(0.0) == 1.0
    calibration.observe(1.0, 4.0, 0.0)
    assert calibration.factor(0.0) == 4.0


def test_wait_calibration_examples() -> None:
    calibration = WaitCalibration(window=4, quantile=0.5, min_samples=1, slack_s=0.1, max_factor=5.0)
    calibration.observe(0.9, 1.9, 0.0)  # (1.9 + 0.1) / (0.9 + 0.1) = 2
    assert calibration.factor(0.0) == pytest.approx(2.0)
    calibration.observe(0.0, 0.0, 0.0)  # slack over slack: 1
    assert calibration.factor(0.0) == pytest.approx(1.0)  # the median of [1, 2] by nearest rank
    calibration.observe(0.0, 10.0, 0.0)  # 101: capped at 5
    calibration.observe(1.0, 0.0, 0.0)  # waits shorter than forecast: 0.09, but never below 1
    assert calibration.factor(0.0) == pytest.approx(1.0)  # [0.09, 1, 2, 101] -> 1
    calibration.observe(0.0, 10.0, 0.0)  # the oldest, 2, leaves the window: [0.09, 1, 101, 101]
    assert calibration.factor(0.0) == pytest.approx(1.0)
    calibration.observe(0.0, 10.0, 0.0)  # [0.09, 101, 101, 101]
    assert calibration.factor(0.0) == 5.0
    calibration.observe(math.inf, 1.0, 0.0)  # an infinite forecast says nothing
    calibration.observe(1.0, math.nan, 0.0)
    assert calibration.factor(0.0) == 5.0


def test_a_high_factor_falls_back_once_its_reports_are_old() -> None:
    # A factor that refuses every forecast task gets no new reports: its old ones expire.
    calibration = WaitCalibration(horizon_s=30.0, min_samples=2, slack_s=0.0)
    calibration.observe(0.1, 1.0, 0.0)
    calibration.observe(0.1, 1.0, 10.0)
    assert calibration.factor(29.9) == pytest.approx(10.0)
    assert calibration.factor(30.0) == 1.0  # the report of 0.0 has expired: one left, too few
    calibration.observe(1.0, 3.0, 35.0)
    assert calibration.factor(39.9) == pytest.approx(10.0)  # [3, 10] by nearest rank at 0.9
    assert calibration.factor(40.0) == 1.0


def test_each_class_is_scaled_by_its_own_reports_once_it_has_enough_by_all_until_then() -> None:
    calibration = ClassCalibration(lambda: WaitCalibration(min_samples=2, slack_s=0.0, quantile=1.0))
    calibration.observe("sheddable", 1.0, 4.0, 0.0)
    calibration.observe("critical", 1.0, 1.0, 0.0)
    # No class has two reports: each is scaled by all of them (the largest ratio, 4).
    assert [calibration.factor(p, 0.0) for p in ("critical", "standard", "sheddable")] == [4.0, 4.0, 4.0]
    calibration.observe("critical", 1.0, 2.0, 1.0)
    calibration.observe("sheddable", 1.0, 6.0, 1.0)
    assert calibration.factor("critical", 1.0) == 2.0  # its own: [1, 2]
    assert calibration.factor("sheddable", 1.0) == 6.0  # its own: [4, 6]
    assert calibration.factor("standard", 1.0) == 6.0  # none of its own: all four, [1, 2, 4, 6]
    assert calibration.pooled.factor(1.0) == 6.0
    # The first reports expire 30 s after they came: each class is left with one, too few.
    assert calibration.factor("critical", 30.0) == 6.0
    assert calibration.factor("critical", 31.0) == 1.0  # none left at all


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.floats(0, 100, allow_nan=False), st.floats(0, 100, allow_nan=False), st.floats(0, 20)),
        min_size=0,
        max_size=60,
    ),
    st.integers(1, 20),
    st.sampled_from([0.5, 0.9, 0.99, 1.0]),
    st.integers(1, 10),
)
def test_wait_calibration_is_the_quantile_of_the_recent_ratios(
    reports: list[tuple[float, float, float]], window: int, quantile: float, min_samples: int
) -> None:
    horizon = 30.0
    calibration = WaitCalibration(
        window=window, horizon_s=horizon, quantile=quantile, min_samples=min_samples, slack_s=0.05
    )
    seen: list[tuple[float, float]] = []
    now = 0.0

    def check(at: float) -> None:
        recent = [ratio for when, ratio in seen[-window:] if when > at - horizon]
        want = 1.0 if len(recent) < min_samples else min(10.0, max(1.0, _nearest_rank(recent, quantile)))
        assert calibration.factor(at) == pytest.approx(want)

    for predicted, waited, step in reports:
        now += step
        check(now)  # what the reports so far say now (the clock only moves forward)
        calibration.observe(predicted, waited, now)
        seen.append((now, (waited + 0.05) / (predicted + 0.05)))
        check(now)
    for later in (horizon / 2, horizon):  # and as they age, with no new report
        check(now + later)


def test_the_scheduler_calibration_defaults() -> None:
    """As the README says: the 0.9 quantile of the last 256 reports of the last 30 s, from
    20 reports on, with 50 ms of slack."""
    calibration = WaitCalibration()
    for _ in range(19):
        calibration.observe(0.0, 0.05, 0.0)  # (0.05 + 0.05) / 0.05 = 2
    assert calibration.factor(0.0) == 1.0
    for _ in range(7):
        calibration.observe(0.0, 0.05, 0.0)
    assert calibration.factor(0.0) == pytest.approx(2.0)
    for _ in range(230):
        calibration.observe(1.0, 1.0, 1.0)
    # 26 twos over 230 ones: the 231st of 256 (the 0.9 quantile by nearest rank) is a 2.
    assert calibration.factor(1.0) == pytest.approx(2.0)
    calibration.observe(1.0, 1.0, 1.0)  # the 257th report pushes out a 2: 231 ones
    assert calibration.factor(1.0) == 1.0
    calibration = WaitCalibration()
    for _ in range(20):
        calibration.observe(0.0, 0.05, 0.0)
    assert calibration.factor(29.99) == pytest.approx(2.0)
    assert calibration.factor(30.0) == 1.0
    for wrong in (0.0, 1.5):
        with pytest.raises(ValueError, match="quantile"):
            WaitCalibration(quantile=wrong)


# --- the chance of waiting past the deadline ---------------------------------------------------


def test_poisson_below_is_the_sum_of_the_first_terms() -> None:
    assert poisson_below(1, 5.0) == pytest.approx(math.exp(-5.0))
    assert poisson_below(2, 5.0) == pytest.approx(6 * math.exp(-5.0))
    assert poisson_below(3, 2.0) == pytest.approx((1 + 2 + 2) * math.exp(-2.0))
    assert poisson_below(0, 5.0) == 0.0 and poisson_below(-1, 5.0) == 0.0
    assert poisson_below(1, 0.0) == 1.0
    assert poisson_below(100, 120.0) == pytest.approx(0.02786, abs=0.00001)  # far terms, in logs


@given(st.integers(1, 400), st.floats(0.01, 500.0))
def test_poisson_below_is_a_probability_that_grows_with_k(k: int, mean: float) -> None:
    below, next_below = poisson_below(k, mean), poisson_below(k + 1, mean)
    assert 0.0 <= below <= next_below <= 1.0


def test_the_late_chance_counts_every_dispatch_the_item_waits_for() -> None:
    # Two dispatches (one over the cap, then its own) at 10/s within 0.5 s: P(N < 2), N ~ Poisson(5).
    assert WaitForecast(ahead=0, share=1.0, rate_per_s=10.0, behind=1).late_chance(0.5) == pytest.approx(
        6 * math.exp(-5.0)
    )
    # At a share of 5/8, its own turn is 1.6 dispatches away: 2 whole ones.
    assert WaitForecast(0, 0.625, 10.0).late_chance(0.5) == pytest.approx(6 * math.exp(-5.0))
    # A calibration of 2 halves the rate: P(N < 1), N ~ Poisson(2.5).
    assert WaitForecast(0, 1.0, 10.0).late_chance(0.5, stretch=2.0) == pytest.approx(math.exp(-2.5))
    assert WaitForecast(0, 1.0, 0.0).late_chance(0.5) == 0.0  # nothing ahead, nothing measured
    assert WaitForecast(1, 1.0, 0.0).late_chance(0.5) == 1.0
    assert WaitForecast(0, 0.0, 10.0).late_chance(0.5) == 0.0


def _exact_poisson_below(k: int, mean: float) -> float:
    return sum(math.exp(n * math.log(mean) - mean - math.lgamma(n + 1)) for n in range(k))


def test_poisson_below_sums_up_to_a_hundred_terms_and_approximates_beyond() -> None:
    assert poisson_below(EXACT_TERMS, 90.0) == pytest.approx(_exact_poisson_below(EXACT_TERMS, 90.0), abs=1e-12)
    # Wilson-Hilferty at k = 101: ((mean / k)^(1/3) - (1 - 1/(9k))) / sqrt(1/(9k)), standard normal.
    z = ((120.0 / 101) ** (1 / 3) - (1 - 1 / 909)) / math.sqrt(1 / 909)
    assert poisson_below(101, 120.0) == pytest.approx(0.5 * math.erfc(z / math.sqrt(2)), rel=1e-12)
    for k in (101, 300, 5_000):
        for ratio in (0.7, 0.9, 1.0, 1.1, 1.4):
            assert abs(poisson_below(k, k * ratio) - _exact_poisson_below(k, k * ratio)) < 1e-4
    assert poisson_below(1, 0.5) == pytest.approx(math.exp(-0.5))


def test_a_forecast_without_a_share_is_never_reached() -> None:
    assert WaitForecast(0, 0.0, 10.0).dispatches() == math.inf
    assert WaitForecast(0, 1.0, 0.0, behind=1).late_chance(0.5) == 1.0
