"""Pure dispatch and retry policies: least-loaded dispatch, backoff."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from actors.backoff import Backoff, retry_after_s
from agentpool.config import RetryPolicy
from scheduler.dispatch import LeastLoaded


class DispatchMachine(RuleBasedStateMachine):
    """Slots are never over-allocated or leaked, and acquire picks a least-loaded worker."""

    def __init__(self) -> None:
        super().__init__()
        self.slots = LeastLoaded(3, 2)
        self.held: list[int] = []

    @rule()
    def acquire(self) -> None:
        before = list(self.slots.load)
        got = self.slots.acquire()
        if got is None:
            assert min(before) == 2
        else:
            assert before[got] == min(before)
            self.held.append(got)

    @precondition(lambda self: bool(self.held))
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        index = data.draw(st.sampled_from(self.held))
        self.held.remove(index)
        self.slots.release(index)

    @invariant()
    def accounted(self) -> None:
        assert self.slots.in_flight == len(self.held) <= self.slots.capacity
        assert all(0 <= n <= 2 for n in self.slots.load)

    def teardown(self) -> None:
        for index in self.held:
            self.slots.release(index)
        assert self.slots.in_flight == 0


TestDispatch = DispatchMachine.TestCase


def test_release_without_acquire_is_an_error() -> None:
    with pytest.raises(ValueError):
        LeastLoaded(1, 1).release(0)


@given(attempt=st.integers(1, 30), server=st.none() | st.floats(0, 120), seed=st.integers(0, 2**32))
def test_backoff_stays_within_bounds_and_honours_retry_after(attempt: int, server: float | None, seed: int) -> None:
    policy = RetryPolicy(base_delay_s=0.5, max_delay_s=20, jitter=0.5)
    delay = Backoff(policy, random.Random(seed)).delay_s(attempt, server)
    ceiling = min(policy.max_delay_s, policy.base_delay_s * 2 ** (attempt - 1))
    assert delay >= (server or 0)
    assert delay <= max(ceiling, server or 0)
    assert delay >= ceiling * 0.5 or delay == server


def test_retry_after_headers() -> None:
    assert retry_after_s({"retry-after-ms": "250", "retry-after": "3"}) == 0.25
    assert retry_after_s({"retry-after": "3"}) == 3.0
    assert retry_after_s({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) is None
    assert retry_after_s({"retry-after": "-5"}) is None
    assert retry_after_s({}) is None
