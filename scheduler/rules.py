"""Admission rules of the pure core, tried in order (`DEFAULT_RULES`): a rule looks at an
arrival and the core and answers a `Reject`, a `Drop` (it made room by evicting someone;
the arrival goes on) or None (no objection). A new rule is one class and one line."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Protocol, TypeVar

from agentpool.errors import Draining
from agentpool.scheduler.decisions import Drop, Reject, Ticket
from agentpool.scheduler.shedding import sheds
from agentpool.vocabulary import ErrorReason

if TYPE_CHECKING:
    from agentpool.scheduler.core import SchedulerCore

T = TypeVar("T")

#: The retry hint of a rejection whose wait cannot be forecast (no rate measured yet).
UNKNOWN_WAIT_RETRY_S = 60.0
#: Retry hints are at least a tenth of a second and at most an hour.
MIN_RETRY_S, MAX_RETRY_S = 0.1, 3600.0
#: A work refused by a draining pool is told to retry this long after its grace period
#: ends: about the time a pool of the same name takes to start again.
DRAIN_RETRY_EXTRA_S = 10.0


class Rule(Protocol):
    """One admission rule: a refusal, an eviction that made room, or None (no objection)."""

    def __call__(self, core: SchedulerCore[T], ticket: Ticket[T], now: float) -> Reject | Drop[T] | None: ...


class RefuseWhileDraining:
    """A draining pool takes no new work: every arrival is refused until the drain is
    undone, with the hint to retry once the grace period is over (on the pool that
    replaces this one)."""

    def __call__(self, core: SchedulerCore[T], ticket: Ticket[T], now: float) -> Reject | None:
        drain = core.draining
        if drain is None:
            return None
        return Reject(
            ErrorReason.DRAINING,
            "the pool is draining (stopping or being upgraded) and takes no new work",
            retry_hint(drain.until - now + DRAIN_RETRY_EXTRA_S),
            kind=Draining,
        )


class ShedOnOverload:
    """A standing queue of interactive work sheds interactive arrivals by class (CoDel)."""

    def __call__(self, core: SchedulerCore[T], ticket: Ticket[T], now: float) -> Reject | None:
        task = ticket.task
        if not sheds(task.priority, core.detector.level(now), task.deadline_s):
            return None
        return Reject(
            ErrorReason.OVERLOAD,
            f"the pool is overloaded: {task.priority} work is shed until the queue drains",
            core.config.admission.interval_s,
        )


class WaitWithinDeadline:
    """An arrival that must queue is refused when its predicted wait, scaled by how far recent
    forecasts fell short, exceeds what it may wait, or when the chance that it waits longer
    than that is over `admission.late_chance` (the dispatches it waits for taken as a Poisson
    process at the forecast's rate). A forecast task keeps its forecast, so the wait it gets
    calibrates the next ones."""

    def __call__(self, core: SchedulerCore[T], ticket: Ticket[T], now: float) -> Reject | None:
        task = ticket.task
        limit = core.max_wait_s(task)
        if not math.isfinite(limit):  # a batch task: it waits its turn, however long
            return None
        must_queue = (
            core.slots.in_flight >= core.slots.capacity
            or not core.tenant_has_room(task.tenant)
            or not core.models.has_room(ticket.limit_key)
        )
        if not must_queue and not core.queue.length(task.tenant):
            return None
        whole = core.forecast(ticket)
        forecast = whole.seconds()
        ticket.predicted_wait_s = forecast
        factor = core.calibration.factor(task.priority, now)
        wait = forecast * factor
        if wait > limit:
            return Reject(
                ErrorReason.PREDICTED_WAIT,
                f"predicted queue wait {wait:.1f}s exceeds the {limit:.1f}s this task may wait",
                retry_hint(wait - limit) if math.isfinite(wait) else UNKNOWN_WAIT_RETRY_S,
            )
        chance = whole.late_chance(limit, factor)
        if chance <= core.config.admission.late_chance:
            return None
        return Reject(
            ErrorReason.PREDICTED_WAIT,
            f"predicted queue wait {wait:.2f}s, with a {chance:.0%} chance of more than the {limit:.1f}s "
            "this task may wait",
            retry_hint(wait),  # once the work ahead of it has gone
        )


class QueueBound:
    """The backlog (in memory and in Redis) holds at most `max_queued` tasks: a full one makes
    room by evicting less important work (or a hog's newest), or refuses the arrival."""

    #: It changes the queue when it admits: `SchedulerCore.refusal` leaves it to `admit`.
    evicts = True

    def __call__(self, core: SchedulerCore[T], ticket: Ticket[T], now: float) -> Reject | Drop[T] | None:
        task = ticket.task
        if core.waiting < core.config.max_queued:
            return None
        victim = core.queue.evict_for(task.tenant, task.priority)
        if victim is None:
            wait = core.forecast(ticket).seconds()
            return Reject(
                ErrorReason.QUEUE_FULL,
                f"queue is full ({core.waiting} tasks waiting)",
                retry_hint(wait) if math.isfinite(wait) else UNKNOWN_WAIT_RETRY_S,
            )
        return core.dropped(victim[1], ErrorReason.EVICTED, f"made room for {task.priority} work of another tenant")


def retry_hint(seconds: float) -> float:
    return round(min(max(MIN_RETRY_S, seconds), MAX_RETRY_S), 3)


#: Admission from live state, in order.
DEFAULT_RULES: tuple[Rule, ...] = (RefuseWhileDraining(), ShedOnOverload(), WaitWithinDeadline(), QueueBound())
