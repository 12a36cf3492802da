"""The worker-count rule and the growable least-loaded dispatch: pure, with hypothesis."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from scheduler.autoscale import WorkerScaler
from scheduler.dispatch import LeastLoaded

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
        assert counts[-1] == min(8, max(1, math.ceil(demand / TARGET))) or (
            abs(demand / (counts[-1] * TARGET) - 1) <= 0.1
        )


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
    with pytest.raises(ValueError):
        _scaler(3, 2)


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
