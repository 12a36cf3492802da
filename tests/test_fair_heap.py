"""The fair queue's heap of backlogged tenants: every choice against a pass over every
tenant (the queue as first written), and its housekeeping."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agentpool.scheduler.fair import FairQueue

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


def test_the_heap_sheds_its_stale_entries_and_still_chooses_right() -> None:
    queue: FairQueue[int] = FairQueue(lambda t: 1.0)
    queue.push("a", "standard", 1)
    queue.push("b", "standard", 2)
    for _ in range(300):  # each charge of a backlogged tenant files it again
        queue.charge("a", 1.0)
    assert len(queue._heap) <= 2 * 2 + 64 + 1
    assert queue.pop() == ("b", 2)
    assert queue.pop() == ("a", 1)


@settings(max_examples=200, deadline=None)
@given(
    pushes=st.lists(
        st.tuples(st.sampled_from(["a", "b"]), st.sampled_from(["critical", "standard", "sheddable"]), st.booleans()),
        max_size=40,
    ),
    removed=st.sets(st.integers(0, 39), max_size=10),
)
def test_a_place_is_how_many_of_its_tenants_items_are_served_before_it(
    pushes: list[tuple[str, str, bool]], removed: set[int]
) -> None:
    fair: FairQueue[int] = FairQueue(lambda tenant: 1.0)
    for item, (tenant, priority, front) in enumerate(pushes):
        fair.push(tenant, priority, item, front=front)
    for item in sorted(removed):
        if item < len(pushes):
            assert fair.remove(pushes[item][0], item)
    places = {item: fair.ahead(tenant, item) for item, (tenant, _, _) in enumerate(pushes)}
    assert all(places[item] is None for item in removed if item < len(pushes))
    assert fair.ahead("c", 0) is None  # a tenant with nothing queued
    for tenant in ("a", "b"):
        served = []
        while (chosen := fair.pop(lambda t, _, mine=tenant: t == mine)) is not None:
            served.append(chosen[1])
        assert {item: places[item] for item in served} == {item: n for n, item in enumerate(served)}
