"""The pure core's vocabulary: a task's ticket and where it is, and the typed decisions the
core returns (`Admit`, `Reject`, `Start`, `Drop`) for its shell to carry out."""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum
from typing import Generic, TypeVar

from agentpool.errors import Overloaded, RetryLater
from agentpool.models import AgentTask
from agentpool.scheduler.shedding import interactive
from agentpool.vocabulary import ErrorReason

T = TypeVar("T")


class Place(StrEnum):
    """Where a ticket is, as far as the core knows."""

    NEW = "new"  # not yet queued
    QUEUED = "queued"
    RUNNING = "running"  # holds a worker slot
    OUT = "out"  # ended, dropped, cancelled, paused or waiting in Redis: nothing of the core's


@dataclass(eq=False)
class Ticket(Generic[T]):
    """The core's view of one task: what it needs to queue, dispatch and charge it.

    `item` is the shell's own handle on the task (the scheduler's `Job`), handed back in
    decisions."""

    item: T
    task: AgentTask
    #: The limits entry of the first model the task will call (None: not rate limited).
    limit_key: str | None
    place: Place = Place.NEW
    #: Ran before (adopted at a restart, its worker died, its approval came): queued first,
    #: as `critical`, and never dropped for waiting.
    resumed: bool = False
    enqueued_at: float = 0.0
    max_wait_s: float = math.inf
    #: The wait forecast at admission, until the wait it got is reported.
    predicted_wait_s: float | None = None
    #: Service charged at dispatch until the task's real usage is known (VTC units).
    estimate: float = 0.0
    #: The worker slot it holds (Place.RUNNING).
    worker: int | None = None

    @property
    def tenant(self) -> str:
        return self.task.tenant

    @property
    def watched(self) -> bool:
        """Interactive work waiting its first turn: its waits are what tells an overload."""
        return not self.resumed and interactive(self.task.priority, self.task.deadline_s)


@dataclass(frozen=True)
class Reject:
    """An arrival refused: why, and when trying again may succeed."""

    reason: ErrorReason
    message: str
    retry_after_s: float
    kind: type[RetryLater] = Overloaded

    def error(self, tenant: str) -> RetryLater:
        return self.kind(self.message, tenant=tenant, reason=self.reason, retry_after_s=self.retry_after_s)


@dataclass(frozen=True)
class Drop(Generic[T]):
    """A queued task that ends without running: out of the queue already."""

    ticket: Ticket[T]
    reason: ErrorReason
    message: str
    retry_after_s: float

    def error(self) -> Overloaded:
        return Overloaded(
            f"dropped from the queue: {self.message}",
            tenant=self.ticket.tenant,
            reason=self.reason,
            retry_after_s=self.retry_after_s,
        )


@dataclass(frozen=True)
class Admit(Generic[T]):
    """An arrival accepted (not queued yet: the shell queues it, or leaves it in Redis)."""

    ticket: Ticket[T]
    evicted: tuple[Drop[T], ...] = ()


@dataclass(frozen=True)
class Start(Generic[T]):
    """A queued task goes to a worker slot, after waiting `waited_s`."""

    ticket: Ticket[T]
    worker: int
    waited_s: float
