"""Dispatch: which worker gets the next task. Least-loaded, with a per-worker slot limit."""

from __future__ import annotations


class LeastLoaded:
    """Tracks in-flight tasks per worker; `acquire` picks the least-loaded worker with room.

    Ties go to the lowest index, so load spreads deterministically.
    """

    def __init__(self, workers: int, slots_per_worker: int) -> None:
        if workers < 1 or slots_per_worker < 1:
            raise ValueError("need at least one worker and one slot")
        self.slots_per_worker = slots_per_worker
        self.load = [0] * workers

    @property
    def in_flight(self) -> int:
        return sum(self.load)

    @property
    def capacity(self) -> int:
        return self.slots_per_worker * len(self.load)

    def acquire(self) -> int | None:
        index = min(range(len(self.load)), key=self.load.__getitem__)
        if self.load[index] >= self.slots_per_worker:
            return None
        self.load[index] += 1
        return index

    def release(self, index: int) -> None:
        if self.load[index] <= 0:
            raise ValueError(f"worker {index} has no task in flight")
        self.load[index] -= 1
