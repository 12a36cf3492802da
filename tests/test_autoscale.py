"""The worker-count rule and the growable least-loaded dispatch: pure, with hypothesis."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from agentpool.scheduler.autoscale import WorkerScaler
from agentpool.scheduler.dispatch import LeastLoaded

TARGET = 10.0


def _scaler(lo: int = 1, hi: int = 8, up: float = 5.0, down: float = 30.0) -> WorkerScaler:
    return WorkerScaler(
        min_workers=lo, max_workers=hi, target_per_worker=TARGET, upscale_delay_s=up, downscale_delay_s=down
    )


def _run(scaler: WorkerScaler, demands: list[tuple[float, float]], current: int) -> list[int]:
    """Feeds (seconds since the last observation, demand) and applies each decision."""
    now, counts = 0.0, []
    for step, demand in demands:
        now += step
        current = scaler.decide(now, demand, current)
        counts.append(current)
    return counts


steps = st.lists(st.tuples(st.floats(0.1, 10), st.floats(0, 200)), min_size=1, max_size=80)


@given(demands=steps, start=st.integers(1, 8))
def test_the_count_stays_within_bounds(demands: list[tuple[float, float]], start: int) -> None:
    assert all(2 <= n <= 6 for n in _run(_scaler(2, 6), demands, start))


@given(demand=st.floats(0, 200), start=st.integers(1, 8), step=st.floats(0.1, 10), n=st.integers(1, 60))
def test_a_steady_demand_moves_the_count_at_most_once(demand: float, start: int, step: float, n: int) -> None:
    counts = _run(_scaler(), [(step, demand)] * n, start)
    changes = sum(a != b for a, b in zip([start, *counts], counts, strict=False))
    assert changes <= 1
    if n * step >= 30 + step:  # long enough for either window: settled where the demand says
        # A count already within the 10% band of the target is left alone (no flapping).
        in_band = abs(demand / (start * TARGET) - 1) <= 0.1
        assert counts[-1] == (start if in_band else min(8, max(1, math.ceil(demand / TARGET))))


@given(demands=steps, start=st.integers(1, 8))
@settings(max_examples=200)
def test_changes_wait_for_their_window(demands: list[tuple[float, float]], start: int) -> None:
    """The pool shrinks only below what every observation of the last 30 s asked for, and
    grows only to what every observation of the last 5 s asked for."""
    scaler = _scaler()
    now, current, seen = 0.0, start, []
    for step, demand in demands:
        now += step
        asked = scaler.recommend(demand, current)
        decided = scaler.decide(now, demand, current)
        seen.append((now, asked))
        if decided < current:
            assert now >= 30
            assert all(r <= decided for t, r in seen if t >= now - 30)
        if decided > current:
            assert now >= 5
            assert all(r >= decided for t, r in seen if t >= now - 5)
        current = decided


def test_a_burst_shorter_than_the_upscale_delay_adds_nobody() -> None:
    scaler = _scaler(up=5)
    counts = _run(scaler, [(1, 5)] * 10 + [(1, 80)] * 3 + [(1, 5)] * 10, 1)
    assert set(counts) == {1}
    counts = _run(_scaler(up=5), [(1, 5)] * 10 + [(1, 80)] * 8, 1)
    assert counts[-1] == 8


def test_bad_bounds_are_refused() -> None:
    message = "^need 1 <= min_workers <= max_workers and a positive target$"
    for lo, hi, target in ((3, 2, 1.0), (0, 2, 1.0), (1, 2, 0.0), (1, 2, -1.0)):
        with pytest.raises(ValueError, match=message):
            WorkerScaler(
                min_workers=lo, max_workers=hi, target_per_worker=target, upscale_delay_s=1, downscale_delay_s=1
            )
    fixed = WorkerScaler(min_workers=3, max_workers=3, target_per_worker=0.5, upscale_delay_s=1, downscale_delay_s=1)
    assert fixed.recommend(100.0, 3) == 3


def _banded(tolerance: float = 0.25) -> WorkerScaler:
    return WorkerScaler(
        min_workers=1,
        max_workers=100,
        target_per_worker=1.0,
        upscale_delay_s=10.0,
        downscale_delay_s=30.0,
        tolerance=tolerance,
    )


@pytest.mark.parametrize(
    ("demand", "current", "wanted"),
    [
        (5.0, 4, 4),  # 5 / 4 - 1 = 0.25: on the band's edge, left alone
        (3.0, 4, 4),  # 3 / 4 - 1 = -0.25: on the other edge
        (5.5, 4, 6),  # beyond: the demand decides
        (2.5, 4, 3),
        (1.25, 1, 1),  # a single worker has a band too
        (1.5, 1, 2),
        (7.0, 0, 7),  # no worker yet: no band
        (0.0, 0, 1),  # never below the minimum
    ],
)
def test_the_tolerance_band_exactly(demand: float, current: int, wanted: int) -> None:
    assert _banded().recommend(demand, current) == wanted
    assert _banded(tolerance=0.0).recommend(demand, current) == max(1, math.ceil(demand))


def test_the_band_is_measured_in_workers_of_the_target_size() -> None:
    scaler = WorkerScaler(
        min_workers=1, max_workers=100, target_per_worker=2.0, upscale_delay_s=1, downscale_delay_s=1, tolerance=0.25
    )
    assert scaler.recommend(10.0, 4) == 4  # 10 / (4 x 2) - 1 = 0.25
    assert scaler.recommend(11.0, 4) == 6


def test_each_window_counts_an_observation_exactly_its_length_old() -> None:
    grow = _banded()
    assert grow.decide(0.0, 20.0, 4) == 4  # wanted 20, but not for 10 s yet
    assert grow.decide(9.99, 25.0, 4) == 4
    assert grow.decide(10.0, 30.0, 4) == 20  # the 0 s observation (20), exactly 10 s old, still counts
    shrink = _banded()
    assert shrink.decide(0.0, 2.0, 10) == 10
    assert shrink.decide(20.0, 1.0, 10) == 10
    assert shrink.decide(29.99, 1.0, 10) == 10
    assert shrink.decide(30.0, 1.0, 10) == 2  # the 0 s observation (2), exactly 30 s old, counts


class GrowingDispatch(RuleBasedStateMachine):
    """Slots are never over-allocated or leaked while workers join and leave; a closed worker
    gets no new task; a worker is retired only when idle."""

    def __init__(self) -> None:
        super().__init__()
        self.slots = LeastLoaded(2, 2)
        self.held: list[int] = []
        self.closed: set[int] = set()

    @rule()
    def acquire(self) -> None:
        got = self.slots.acquire()
        if got is not None:
            assert got not in self.closed
            self.held.append(got)

    @precondition(lambda self: bool(self.held))
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        index = data.draw(st.sampled_from(self.held))
        self.held.remove(index)
        self.slots.release(index)

    @rule()
    def add(self) -> None:
        index = self.slots.add()
        assert self.slots.load[index] == 0
        self.closed.discard(index)

    @precondition(lambda self: self.slots.open_count > 0)
    @rule()
    def close(self) -> None:
        index = self.slots.drain_order()[0]
        self.slots.close(index)
        self.closed.add(index)

    @rule(data=st.data())
    def retire(self, data: st.DataObject) -> None:
        idle = sorted(i for i in self.closed if i not in self.held)
        if idle:
            index = data.draw(st.sampled_from(idle))
            self.slots.retire(index)
            self.closed.discard(index)

    @invariant()
    def accounted(self) -> None:
        assert self.slots.in_flight == len(self.held)
        assert all(0 <= n <= 2 for n in self.slots.load)
        assert self.slots.capacity == 2 * self.slots.open_count


TestGrowingDispatch = GrowingDispatch.TestCase
