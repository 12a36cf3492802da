"""The scheduler core's deadline rescue: a queued task whose deadline comes before its
model's next dispatch starts ahead of fair order, earliest deadline first."""

from __future__ import annotations

from agentpool.scheduler.core import RESCUE_DISPATCHES, Place, SchedulerCore, Ticket
from tests.core_cases import core_of, queued, result, starts, task


def busy_core() -> tuple[SchedulerCore[str], Ticket[str]]:
    """A core whose one slot is taken, admitting anything (a near-zero forecast)."""
    core = core_of(workers=1, slots=1)
    core.mean_run_s = 0.001
    busy = queued(core, task("c", 99))
    assert starts(core.dispatch(0.0)) == [("c-99", 0)]
    return core, busy


def slow(core: SchedulerCore[str]) -> None:
    """One task per second from now on: the next dispatch is expected a second away."""
    core.mean_run_s = float(core.slots.capacity)
    assert core.service_rate(core.ticket("probe", task())) == 1.0


def test_a_task_whose_deadline_comes_before_the_next_dispatch_starts_first() -> None:
    core, busy = busy_core()
    queued(core, task("a", 1), now=0.0)  # a batch task, first in fair order
    urgent = queued(core, task("c", 2, deadline_s=1.5), now=0.25)  # due at 1.75
    slow(core)
    core.finish(busy)
    assert starts(core.dispatch(0.75)) == [("c-2", 0)]  # due exactly at the next dispatch
    assert urgent.place is Place.RUNNING
    core.finish(urgent, result(urgent.task), run_s=1.0)
    assert starts(core.dispatch(1.0)) == [("a-1", 0)]


def test_a_task_with_time_to_spare_keeps_its_fair_turn() -> None:
    core, busy = busy_core()
    queued(core, task("a", 1), now=0.0)
    queued(core, task("c", 2, deadline_s=1.5), now=0.25)  # due at 1.75
    slow(core)
    core.finish(busy)
    assert starts(core.dispatch(0.625)) == [("a-1", 0)]  # the next dispatch at 1.625: fair order


def test_the_earliest_deadline_goes_first_and_a_tenant_without_room_is_passed_over() -> None:
    core = core_of(workers=2, slots=1)
    core.mean_run_s = 0.001
    busy = queued(core, task("c", 99))
    held = queued(core, task("b", 0))  # b may run one task at a time
    assert [item for item, _ in starts(core.dispatch(0.0))] == ["c-99", "b-0"]
    queued(core, task("a", 1), now=0.0)
    queued(core, task("b", 2, deadline_s=1.0), now=0.0)  # due at 1.0, but b is at its cap
    queued(core, task("c", 3, deadline_s=1.3), now=0.0)  # due at 1.3
    queued(core, task("a", 4, deadline_s=1.2), now=0.0)  # due at 1.2, behind a-1 in a's queue
    slow(core)
    worker = busy.worker
    core.finish(busy)
    assert starts(core.dispatch(0.5)) == [("a-4", worker)]
    core.finish(held)
    assert [item for item, _ in starts(core.dispatch(0.6))] == ["b-2"]
    assert {t.item for _, _, t in core.queue.items()} == {"a-1", "c-3"}


def test_a_task_already_started_or_cancelled_is_not_rescued() -> None:
    core, busy = busy_core()
    gone = queued(core, task("a", 1, deadline_s=1.0), now=0.0)
    assert core.remove(gone)
    queued(core, task("c", 2), now=0.0)
    slow(core)
    core.finish(busy)
    assert starts(core.dispatch(0.5)) == [("c-2", 0)]
    assert core._due(0.5) is None and not core._deadlines


def test_a_task_past_its_deadline_is_dropped_not_started() -> None:
    core, busy = busy_core()
    late = queued(core, task("a", 1, deadline_s=0.5), now=0.0)
    queued(core, task("c", 2), now=0.0)
    slow(core)
    core.finish(busy)
    decisions = core.dispatch(0.8)
    assert starts(decisions) == [("c-2", 0)]
    assert late.place is Place.OUT and [d.ticket.item for d in decisions] == ["a-1", "c-2"]


def test_the_deadline_heap_stays_bounded_by_the_queue() -> None:
    core = core_of(workers=1, slots=1)
    core.mean_run_s = 0.001
    for n in range(500):  # each starts and ends before the next: every entry goes stale
        ticket = queued(core, task("a", n, deadline_s=60.0), now=float(n))
        assert starts(core.dispatch(float(n))) == [(f"a-{n}", 0)]
        core.finish(ticket)
    assert len(core._deadlines) <= 2 * len(core.queue) + 64 + 1
    assert RESCUE_DISPATCHES > 0
