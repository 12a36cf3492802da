"""Weighted fair queueing across tenants by service received, in token units.

This is the Virtual Token Counter of "Fairness in Serving Large Language Models" (Sheng et
al., OSDI 2024): each tenant has a counter of the service it received, in tokens divided by
its weight (input + 2 x output, as output tokens cost the provider about twice as much);
the next item served is the head of the backlogged tenant with the smallest counter. A
tenant that returns from idle has its counter lifted to the smallest counter among the
backlogged tenants (or to the last served counter when none is), so credit saved up while
idle cannot become a burst. It is work-conserving: whoever is backlogged is served.

Within a tenant, items go by priority class (`critical`, then `standard`, then
`sheddable`) and first-in first-out within a class. Pure: no clock, no asyncio, no Ray.

The backlogged tenants are kept in a heap by (counter, when they became backlogged), so
finding the next one costs O(log T) rather than a pass over all T tenants: with thousands
of tenants waiting, that pass was most of the scheduler's time. An entry goes stale when
its tenant's counter changes (a new one is pushed) or its queue empties, and is dropped
when it reaches the top.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from agentpool.models import PRIORITIES

T = TypeVar("T")

__all__ = ["PRIORITIES", "FairQueue", "token_cost"]
#: Idle tenants whose counters no longer matter are forgotten beyond this many.
MAX_REMEMBERED_TENANTS = 10_000


def token_cost(input_tokens: float, output_tokens: float) -> float:
    """Service in VTC units: output tokens weigh twice as much as input tokens."""
    return input_tokens + 2.0 * output_tokens


class FairQueue(Generic[T]):
    """Per-tenant, per-priority FIFOs served by smallest weighted service counter."""

    def __init__(self, weight: Callable[[str], float]) -> None:
        self._weight = weight
        self._queues: dict[str, dict[str, deque[T]]] = {}
        self.counters: dict[str, float] = {}
        self._last_served = 0.0
        self._len = 0
        #: (counter, backlog order, tenant) of every backlogged tenant, and stale entries.
        self._heap: list[tuple[float, int, str]] = []
        #: When each backlogged tenant became backlogged (ties go to the earliest).
        self._order: dict[str, int] = {}
        self._backlogs = 0

    def __len__(self) -> int:
        return self._len

    def backlogged(self) -> list[str]:
        return list(self._queues)

    def push(self, tenant: str, priority: str, item: T, *, front: bool = False) -> None:
        """Queues `item` last in its tenant's class, or first with `front` (work resumed)."""
        if tenant not in self._queues:
            self._lift(tenant)
            self._queues[tenant] = {p: deque() for p in PRIORITIES}
            self._backlogs += 1
            self._order[tenant] = self._backlogs
            self._index(tenant)
        queue = self._queues[tenant][priority]
        if front:
            queue.appendleft(item)
        else:
            queue.append(item)
        self._len += 1

    def _lift(self, tenant: str) -> None:
        floor = self._smallest()
        self.counters[tenant] = max(self.counters.get(tenant, 0.0), self._last_served if floor is None else floor)

    def _index(self, tenant: str) -> None:
        """Files a backlogged tenant in the heap under its current counter."""
        heapq.heappush(self._heap, (self.counters[tenant], self._order[tenant], tenant))
        if len(self._heap) > 2 * len(self._queues) + 64:  # mostly stale: rebuild it
            self._heap = [(self.counters[t], self._order[t], t) for t in self._queues]
            heapq.heapify(self._heap)

    def _live(self, entry: tuple[float, int, str]) -> bool:
        counter, order, tenant = entry
        return self._order.get(tenant) == order and self.counters[tenant] == counter

    def _scan(self, wanted: Callable[[str], bool]) -> str | None:
        """The backlogged tenant with the smallest counter (then the earliest backlogged) that
        `wanted` accepts, or None. Stale entries met on the way are dropped."""
        heap, passed = self._heap, []
        found: str | None = None
        while heap:
            entry = heap[0]
            if not self._live(entry):
                heapq.heappop(heap)
                continue
            if wanted(entry[2]):
                found = entry[2]
                break
            passed.append(heapq.heappop(heap))
        for entry in passed:
            heapq.heappush(heap, entry)
        return found

    def _smallest(self, *, besides: str | None = None) -> float | None:
        """The smallest counter of the backlogged tenants (other than `besides`), or None."""
        tenant = self._scan(lambda t: t != besides)
        return None if tenant is None else self.counters[tenant]

    def head(self, eligible: Callable[[str, T], bool] | None = None) -> tuple[str, T] | None:
        """The next item to serve without removing it: the smallest-counter tenant among those
        whose head item is eligible (ties go to the tenant backlogged longest)."""
        tenant = self._scan(lambda t: eligible is None or eligible(t, _first(self._queues[t])))
        return None if tenant is None else (tenant, _first(self._queues[tenant]))

    def heads(self) -> list[tuple[str, T]]:
        """The next item of every backlogged tenant."""
        return [(tenant, _first(classes)) for tenant, classes in self._queues.items()]

    def pop(self, eligible: Callable[[str, T], bool] | None = None) -> tuple[str, T] | None:
        chosen = self.head(eligible)
        if chosen is not None:
            self.remove(chosen[0], chosen[1])
        return chosen

    def charge(self, tenant: str, cost: float) -> None:
        """Adds `cost` tokens of service to `tenant`; a negative cost corrects an estimate.

        A correction never takes a counter below the smallest counter of the other backlogged
        tenants (nor lowers one already below it): like credit saved while idle, a refund for
        work overestimated at dispatch must not become a burst that makes others wait. A new
        tenant's first tasks, charged from `max_tokens`, would otherwise win back seconds of
        exclusive service when their real usage comes in.
        """
        current = self.counters.get(tenant, self._last_served)
        value = current + cost / self._weight(tenant)
        if cost < 0:
            floor = self._smallest(besides=tenant)
            value = max(value, min(current, value if floor is None else floor))
        self.counters[tenant] = value
        if cost > 0:
            self._last_served = value
        if tenant in self._queues and value != current:
            self._index(tenant)

    def remove(self, tenant: str, item: T) -> bool:
        classes = self._queues.get(tenant)
        if classes is None:
            return False
        for queue in classes.values():
            if item not in queue:  # (deque.remove would format the item into its error)
                continue
            queue.remove(item)
            self._len -= 1
            if not any(classes.values()):
                del self._queues[tenant]
                del self._order[tenant]
                self._forget_idle()
            return True
        return False

    def evict_for(self, tenant: str, priority: str) -> tuple[str, T] | None:
        """Makes room in a full queue for an arrival of `tenant` at `priority`, or returns None.

        The victim is the newest item of the least important class below the arrival's,
        from the tenant holding the most weighted queue space; failing that, the newest item
        of the arrival's own class from a tenant holding more weighted queue space than the
        arrival's tenant would: a flood fills the queue, but cannot keep others out of it.
        """
        rank = PRIORITIES.index(priority)
        for lower in reversed(PRIORITIES[rank + 1 :]):
            holders = [t for t, classes in self._queues.items() if classes[lower]]
            if holders:
                return self._pop_newest(max(holders, key=self.weighted_length), lower)
        hog = max(self._queues, key=self.weighted_length, default=None)
        mine = (self.length(tenant) + 1) / self._weight(tenant)
        if hog is None or hog == tenant or self.weighted_length(hog) <= mine or not self._queues[hog][priority]:
            return None
        return self._pop_newest(hog, priority)

    def length(self, tenant: str, *, at_least: str | None = None) -> int:
        """Items `tenant` has waiting; with `at_least`, only those of that class or a more important one."""
        classes = self._queues.get(tenant)
        if classes is None:
            return 0
        top = len(PRIORITIES) if at_least is None else PRIORITIES.index(at_least) + 1
        return sum(len(classes[p]) for p in PRIORITIES[:top])

    def ahead(self, tenant: str, item: T) -> int | None:
        """How many of `tenant`'s items go before `item` (classes in order, then FIFO within
        its class); None if it is not queued."""
        classes = self._queues.get(tenant)
        if classes is None:
            return None
        before = 0
        for priority in PRIORITIES:
            queue = classes[priority]
            if item in queue:
                return before + queue.index(item)
            before += len(queue)
        return None

    def weighted_length(self, tenant: str) -> float:
        return self.length(tenant) / self._weight(tenant)

    def weight(self, tenant: str) -> float:
        return self._weight(tenant)

    def _pop_newest(self, tenant: str, priority: str) -> tuple[str, T]:
        item = self._queues[tenant][priority][-1]
        self.remove(tenant, item)
        return tenant, item

    def items(self) -> Iterator[tuple[str, str, T]]:
        for tenant, classes in list(self._queues.items()):
            for priority, queue in classes.items():
                for item in list(queue):
                    yield tenant, priority, item

    def depth(self) -> dict[str, dict[str, int]]:
        """Waiting items per tenant and priority class (empty classes left out)."""
        return {tenant: {p: len(q) for p, q in classes.items() if q} for tenant, classes in self._queues.items()}

    def _forget_idle(self) -> None:
        if len(self.counters) <= MAX_REMEMBERED_TENANTS:
            return
        # An idle tenant at or below the backlogged minimum would be lifted on return anyway.
        smallest = self._smallest()
        floor = self._last_served if smallest is None else smallest
        for tenant in [t for t, c in self.counters.items() if t not in self._queues and c <= floor]:
            del self.counters[tenant]


def _first(classes: dict[str, deque[T]]) -> T:
    for priority in PRIORITIES:
        if classes[priority]:
            return classes[priority][0]
    raise AssertionError("a backlogged tenant has an item")  # removed tenants leave _queues
