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


def test_the_next_dispatch_is_expected_one_service_interval_away() -> None:
    core, busy = busy_core()
    queued(core, task("a", 1), now=0.0)
    queued(core, task("c", 2, deadline_s=1.0), now=0.0)  # due at 1.0
    core.mean_run_s = 0.5  # two tasks a second: the next dispatch half a second away
    core.finish(busy)
    assert starts(core.dispatch(0.25)) == [("a-1", 0)]  # 1.0 > 0.75


def test_a_passed_over_task_is_rescued_once_its_tenant_has_room() -> None:
    core = core_of(workers=2, slots=1)
    core.mean_run_s = 0.001
    busy, held = queued(core, task("c", 99)), queued(core, task("b", 0))
    core.dispatch(0.0)
    queued(core, task("a", 1), now=0.0)
    queued(core, task("b", 3, deadline_s=1.0), now=0.0)  # due at 1.0, b at its cap
    queued(core, task("b", 4, deadline_s=1.1), now=0.0)  # due at 1.1, behind b-3
    queued(core, task("a", 6, deadline_s=1.2), now=0.0)  # due at 1.2, behind a-1
    gone = queued(core, task("c", 5, deadline_s=0.6), now=0.0)
    assert core.remove(gone)  # cancelled: its entry, first in the heap, is stale
    slow(core)
    worker = busy.worker
    core.finish(busy)
    assert starts(core.dispatch(0.5)) == [("a-6", worker)]  # b-3 and b-4 passed over
    assert sorted(t.item for _, _, t in core._deadlines) == ["b-3", "b-4"]  # kept; the stale one gone
    core.finish(held)
    assert [item for item, _ in starts(core.dispatch(0.55))] == ["b-3"]


def test_the_heap_is_rebuilt_once_stale_entries_outnumber_the_queue() -> None:
    core = core_of(workers=2, slots=1)
    core.mean_run_s = 0.001  # a dispatch every millisecond: nothing is due
    queued(core, task("b", 0))
    core.dispatch(0.0)
    queued(core, task("b", 1, deadline_s=10.0))  # b is at its cap: its entry stays on top
    for n in range(1, 68):  # each starts at once and its entry goes stale under b-1's
        ticket = queued(core, task("a", n, deadline_s=60.0))
        assert starts(core.dispatch(0.0)) == [(f"a-{n}", 1)]
        core.finish(ticket)
    assert len(core._deadlines) == 68  # b-1 and 67 stale: not more than 2 x 2 queued + 64
    queued(core, task("a", 68, deadline_s=60.0))
    assert len(core._deadlines) == 2  # b-1 and a-68: the stale ones went


def test_a_due_task_without_room_keeps_its_entry_when_nothing_is_rescued() -> None:
    core = core_of(workers=2, slots=1)
    core.mean_run_s = 0.001
    busy = queued(core, task("c", 99))
    queued(core, task("b", 0))
    core.dispatch(0.0)
    queued(core, task("a", 1), now=0.0)
    queued(core, task("b", 3, deadline_s=1.0), now=0.0)  # due at 1.0, b at its cap
    queued(core, task("a", 7, deadline_s=60.0), now=0.0)  # not due: the search stops there
    slow(core)
    worker = busy.worker
    core.finish(busy)
    assert starts(core.dispatch(0.5)) == [("a-1", worker)]
    assert sorted(t.item for _, _, t in core._deadlines) == ["a-7", "b-3"]
