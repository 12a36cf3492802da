"""Least-loaded dispatch over a set of workers that can grow and shrink (pure, no Ray)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable


class LeastLoaded:
    """Tracks in-flight tasks per worker; `acquire` picks the least-loaded open worker with room.

    Ties go to the lowest index, so load spreads deterministically. Workers are added with
    `add` and leave in two steps: `close` (no new tasks; its running ones finish) and, once
    its load is zero, `retire`, after which its index may be reused by a later `add`.
    """

    def __init__(self, workers: int, slots_per_worker: int) -> None:
        if workers < 1 or slots_per_worker < 1:
            raise ValueError("need at least one worker and one slot")
        self.slots_per_worker = slots_per_worker
        self.load = [0] * workers
        self.open = [True] * workers
        self._retired: list[int] = []

    @property
    def in_flight(self) -> int:
        return sum(self.load)

    @property
    def open_count(self) -> int:
        return sum(self.open)

    @property
    def capacity(self) -> int:
        return self.slots_per_worker * self.open_count

    def acquire(self) -> int | None:
        candidates = [i for i, is_open in enumerate(self.open) if is_open]
        if not candidates:
            return None
        index = min(candidates, key=self.load.__getitem__)
        if self.load[index] >= self.slots_per_worker:
            return None
        self.load[index] += 1
        return index

    def release(self, index: int) -> None:
        if self.load[index] <= 0:
            raise ValueError(f"worker {index} has no task in flight")
        self.load[index] -= 1

    def add(self) -> int:
        """Opens a new worker's slots; returns its index."""
        if self._retired:
            index = self._retired.pop()
            self.open[index] = True
            return index
        self.load.append(0)
        self.open.append(True)
        return len(self.load) - 1

    def close(self, index: int) -> None:
        """Stops giving the worker new tasks."""
        if not self.open[index]:
            raise ValueError(f"worker {index} is not open")
        self.open[index] = False

    def reopen(self, index: int) -> None:
        """Gives a closed (not retired) worker new tasks again."""
        if self.open[index] or index in self._retired:
            raise ValueError(f"worker {index} is open or retired")
        self.open[index] = True

    def retire(self, index: int) -> None:
        """Forgets a closed worker whose tasks have all ended."""
        if self.open[index] or self.load[index] or index in self._retired:
            raise ValueError(f"worker {index} is open, busy or already retired")
        self._retired.append(index)

    def drain_order(self, node_of: Callable[[int], str | None] | None = None) -> list[int]:
        """Open workers in the order to close them: those on the nodes with the fewest open
        workers left first (`node_of`; a worker whose node is unknown, None, counts as alone
        on its node, after the known ones), so that closing a few empties whole nodes an
        autoscaler can then remove, even if a worker there still has tasks to finish; then
        the least loaded (the quickest to close); then the newest. Without `node_of`, the
        least loaded first."""
        left = [i for i, o in enumerate(self.open) if o]
        where = {i: node_of(i) if node_of is not None else None for i in left}
        on_node: Counter[str | None] = Counter(n for n in where.values() if n is not None)
        order: list[int] = []
        while left:
            index = min(left, key=lambda i: (on_node[where[i]] or 1, where[i] is None, self.load[i], -i))
            left.remove(index)
            order.append(index)
            if where[index] is not None:
                on_node[where[index]] -= 1
        return order
