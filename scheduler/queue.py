"""A bounded FIFO of waiting tasks, served oldest-first among those allowed to run now."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class BoundedFifo(Generic[T]):
    """FIFO with a hard bound; `pop_first` skips items that may not run yet (for example a
    tenant at its concurrency cap) without losing their place."""

    def __init__(self, bound: int) -> None:
        if bound < 1:
            raise ValueError("bound must be >= 1")
        self.bound = bound
        self._items: deque[T] = deque()

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[T]:
        return iter(list(self._items))

    @property
    def full(self) -> bool:
        return len(self._items) >= self.bound

    def offer(self, item: T) -> bool:
        """Appends `item`; False (and nothing stored) when the queue is full."""
        if self.full:
            return False
        self._items.append(item)
        return True

    def pop_first(self, eligible: Callable[[T], bool] = lambda _: True) -> T | None:
        for index, item in enumerate(self._items):
            if eligible(item):
                del self._items[index]
                return item
        return None

    def remove(self, item: T) -> bool:
        try:
            self._items.remove(item)
        except ValueError:
            return False
        return True
