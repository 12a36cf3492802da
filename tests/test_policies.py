"""Pure dispatch and retry policies: least-loaded dispatch, backoff."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from agentpool.actors.backoff import Backoff, retry_after_s
from agentpool.config import RetryPolicy
from agentpool.scheduler.dispatch import LeastLoaded


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
    with pytest.raises(ValueError, match=r"^worker 0 has no task in flight$"):
        LeastLoaded(1, 1).release(0)


def test_the_smallest_pool_is_one_worker_with_one_slot() -> None:
    assert LeastLoaded(1, 1).capacity == 1
    for workers, slots in ((0, 1), (1, 0), (0, 0)):
        with pytest.raises(ValueError, match=r"^need at least one worker and one slot$"):
            LeastLoaded(workers, slots)


def test_workers_join_leave_and_come_back() -> None:
    slots = LeastLoaded(2, 2)
    assert slots.add() == 2 and slots.open == [True, True, True]
    assert [slots.acquire() for _ in range(4)] == [0, 1, 2, 0]
    assert slots.drain_order() == [2, 1, 0]  # least loaded, then newest first
    slots.close(2)
    with pytest.raises(ValueError, match=r"^worker 2 is not open$"):
        slots.close(2)
    assert slots.acquire() == 1 and slots.acquire() is None  # 2 takes nothing new
    with pytest.raises(ValueError, match=r"^worker 2 is open, busy or already retired$"):
        slots.retire(2)  # still running its task
    slots.reopen(2)
    with pytest.raises(ValueError, match=r"^worker 2 is open or retired$"):
        slots.reopen(2)
    with pytest.raises(ValueError, match=r"^worker 1 is open, busy or already retired$"):
        slots.retire(1)  # open
    assert slots.acquire() == 2
    slots.close(2)
    slots.release(2)
    slots.release(2)
    slots.retire(2)
    with pytest.raises(ValueError, match=r"^worker 2 is open, busy or already retired$"):
        slots.retire(2)
    with pytest.raises(ValueError, match=r"^worker 2 is open or retired$"):
        slots.reopen(2)
    assert slots.open_count == 2 and slots.capacity == 4
    assert slots.add() == 2 and slots.open[2] and slots.acquire() == 2  # the retired index is reused
    assert slots.add() == 3 and slots.load == [2, 2, 1, 0]
    slots.close(0)
    slots.release(0)
    slots.release(0)
    slots.retire(0)
    assert slots.drain_order() == [3, 2, 1]


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


def test_idle_workers_drain_node_by_node_so_that_whole_nodes_empty() -> None:
    # Nodes a: {0, 3}, b: {1}, c: {2, 4}, and 5 somewhere unknown; all idle but 4.
    slots = LeastLoaded(6, 2)
    where = {0: "a", 1: "b", 2: "c", 3: "a", 4: "c"}
    assert [slots.acquire() for _ in range(6)] == [0, 1, 2, 3, 4, 5]
    for index in (0, 1, 2, 3, 5):
        slots.release(index)
    # b's only worker first (its node empties), then the unknown one (alone, as far as we
    # know), then a's two (the newest first), c's idle one, and c's busy worker 4 last.
    assert slots.drain_order(where.get) == [1, 5, 3, 0, 2, 4]
    assert slots.drain_order() == [5, 3, 2, 1, 0, 4]  # no nodes known: as before


@given(
    loads=st.lists(st.integers(0, 3), min_size=1, max_size=12),
    nodes=st.lists(st.sampled_from(["a", "b", "c", None]), min_size=12, max_size=12),
)
def test_the_drain_order_takes_every_open_worker_once_emptying_one_node_at_a_time(
    loads: list[int], nodes: list[str | None]
) -> None:
    slots = LeastLoaded(len(loads), 3)
    slots.load = list(loads)
    assert [loads[i] for i in slots.drain_order()] == sorted(loads)  # no nodes known: least loaded first
    order = slots.drain_order(lambda i: nodes[i])
    assert sorted(order) == list(range(len(loads)))
    on = {n: {i for i in range(len(loads)) if nodes[i] == n} for n in set(nodes[: len(loads)]) - {None}}
    for k in range(len(order) + 1):  # at any point, at most one known node is part-drained
        gone = set(order[:k])
        assert sum(1 for members in on.values() if gone & members and members - gone) <= 1


def test_a_busy_worker_alone_on_its_node_drains_before_idle_ones_that_share_theirs() -> None:
    slots = LeastLoaded(3, 4)
    slots.load = [0, 0, 3]
    assert slots.drain_order({0: "a", 1: "a", 2: "b"}.get) == [2, 1, 0]  # b empties; a's worker stays
    assert slots.drain_order() == [1, 0, 2]


def test_workers_of_unknown_nodes_count_as_alone_however_many_drain_before_them() -> None:
    slots = LeastLoaded(4, 2)
    slots.load = [1, 2, 0, 1]  # 0 alone on a, 1 on b; 2 and 3 on nodes not known
    # The known lone workers first (a's, then b's: their nodes empty), then the unknown
    # ones, the idle one first.
    assert slots.drain_order({0: "a", 1: "b"}.get) == [0, 1, 2, 3]
