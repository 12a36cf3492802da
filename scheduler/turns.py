"""One task at a time per session: who runs, who waits and in what order (pure: no Ray, no
Redis, no clock).

Each session has a line: its head holds the session's turn (queued, running or paused in
the scheduler), the rest wait. A task arriving at a busy session follows its `OnBusy`:
`reject` leaves at once, `enqueue` joins the end of the line, and `interrupt`/`rollback` join
ahead of every waiting `enqueue` task (behind earlier such arrivals) and ask for the head's
run to be stopped. The head leaves when its task ends; the next in line then holds the turn.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from enum import StrEnum
from typing import Generic, TypeVar

from agentpool.vocabulary import OnBusy

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")


class Turn(StrEnum):
    """What an arrival does (`SessionTurns.arrive`)."""

    #: The session was free: it holds the turn now.
    RUN = "run"
    #: It waits in line behind the task that holds the turn.
    WAIT = "wait"
    #: It waits, next or behind other interrupting tasks; the holder is to be stopped.
    PREEMPT = "preempt"
    #: It is refused (`on_busy="reject"`): the session is busy.
    REJECT = "reject"


@dataclass(frozen=True)
class Arrival(Generic[T]):
    turn: Turn
    #: The task holding the session's turn when this one arrived (None: it was free).
    holder: T | None = None


class SessionTurns(Generic[K, T]):
    """The lines of every session with a task in the scheduler. Items are compared by
    identity (a task's scheduler job), so equal values never stand for one another."""

    def __init__(self) -> None:
        #: Each session's line: its items, each with whether it arrived to interrupt.
        self._lines: dict[K, list[tuple[T, bool]]] = {}

    def __len__(self) -> int:
        return len(self._lines)

    def arrive(self, key: K, item: T, on_busy: OnBusy) -> Arrival[T]:
        line = self._lines.get(key)
        if not line:
            self._lines[key] = [(item, False)]
            return Arrival(Turn.RUN)
        holder = line[0][0]
        if any(other is item for other, _ in line):  # again: it keeps its place
            return Arrival(Turn.RUN if holder is item else Turn.WAIT, holder)
        if on_busy == OnBusy.REJECT:
            return Arrival(Turn.REJECT, holder)
        if on_busy.preempts:
            at = 1
            while at < len(line) and line[at][1]:
                at += 1
            line.insert(at, (item, True))
            return Arrival(Turn.PREEMPT, holder)
        line.append((item, False))
        return Arrival(Turn.WAIT, holder)

    def leave(self, key: K, item: T) -> T | None:
        """`item` leaves its session's line (its task ended, or gave up waiting). Returns
        the item that holds the turn now, if the turn passed to it; else None."""
        line = self._lines.get(key)
        at = self.place(key, item)
        if line is None or at is None:
            return None
        del line[at]
        if not line:
            del self._lines[key]
            return None
        return line[0][0] if at == 0 else None

    def holder(self, key: K) -> T | None:
        line = self._lines.get(key)
        return line[0][0] if line else None

    def line(self, key: K) -> list[T]:
        """The session's line: the holder first, then the waiting in the order they will run."""
        return [item for item, _ in self._lines.get(key, ())]

    def place(self, key: K, item: T) -> int | None:
        """How many go before `item` in its session's line (0: it holds the turn); None if
        it is not in it."""
        return next((i for i, (other, _) in enumerate(self._lines.get(key, ())) if other is item), None)
