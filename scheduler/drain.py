"""Draining the scheduler before a stop, and restarting its workers in an upgrade (a mixin
of `Scheduler`).

A drain makes the core refuse every arrival (`ErrorReason.DRAINING`, with a retry hint past
the grace period) and start nothing more; the tasks running go on to their end while the
drain waits for them, at most its grace period. Nothing is handed anywhere: every accepted
task is in the Redis backlog from its admission, and every running one checkpoints after
each step, so what the drain leaves is what the next pool of this name takes up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from redis.exceptions import RedisError

from agentpool.results import DrainReport
from agentpool.vocabulary import ErrorReason

if TYPE_CHECKING:
    from agentpool.cluster.store import ResultStore
    from agentpool.scheduler.core import SchedulerCore
    from agentpool.scheduler.fleet import WorkerFleet
    from agentpool.scheduler.jobs import Job

log = logging.getLogger("agentpool.scheduler")


class DrainControl:
    """`drain`, `undrain`, and what `status()` says of a drain."""

    _jobs: dict[str, Job]
    _core: SchedulerCore[Job]
    _fleet: WorkerFleet
    _shed: Counter[str]
    _clock: Callable[[], float]
    _store: ResultStore
    _extra_info: dict[str, Any]

    if TYPE_CHECKING:  # Scheduler's; declared here for the type checker only

        def _pump(self) -> None: ...
        def _awaiting(self) -> dict[str, list[str]]: ...

    def _init_drain(self) -> None:
        #: Refusals for draining counted before the current drain began.
        self._refused_before = 0
        #: Set once no task runs, while a drain waits for that.
        self._idle: asyncio.Event | None = None

    @property
    def _launch(self) -> str:
        """Which start of the pool this scheduler belongs to: the same across restarts by
        Ray (the same constructor arguments), another for a pool started again."""
        return str(self._extra_info.get("launch", ""))

    async def _note_drain(self, until: float | None) -> None:
        """Keeps the drain (or its end) in Redis, so that a restarted scheduler goes on
        draining; if Redis is away, a restart in the meantime forgets it (logged)."""
        try:
            if until is None:
                await self._store.live_config.clear_drain()
            else:
                await self._store.live_config.save_drain(self._launch, time.time() + (until - self._clock()))
        except (RedisError, OSError) as exc:
            log.error("could not note the drain in Redis (%s): a restarted scheduler would not know of it", exc)

    async def _load_drain(self) -> None:
        """At boot: goes on with the drain this launch noted before a restart."""
        until_unix = await self._store.live_config.load_drain(self._launch)
        if until_unix is None:
            return
        left_s = until_unix - time.time()
        self._refused_before = self._shed[ErrorReason.DRAINING]
        self._core.drain(self._clock(), left_s)
        log.warning("still draining after a restart: no new work (grace period: %.0fs left)", left_s)

    def _note_idle(self) -> None:
        """Called as slots free (`_pump`): wakes a drain waiting for the last run to end."""
        if self._idle is not None and not self._core.slots.in_flight:
            self._idle.set()

    async def drain(self, grace_s: float) -> dict[str, Any]:
        """Stops admitting and starting work, waits up to `grace_s` for the running tasks to
        end, and reports what is left (a `DrainReport` as a dict). Called again while
        draining, it waits again (the first call's grace period sets the retry hint)."""
        began = self._clock()
        if self._core.draining is None:
            self._refused_before = self._shed[ErrorReason.DRAINING]
            self._core.drain(began, grace_s)
            log.warning("draining: no new work; up to %.0fs for %d running", grace_s, self._core.slots.in_flight)
            await self._note_drain(began + grace_s)
        running = [job for job in self._jobs.values() if job.state == "running"]
        idle = self._idle = asyncio.Event()
        self._note_idle()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(idle.wait(), max(0.0, grace_s))
        if self._idle is idle:
            self._idle = None
        report = DrainReport(
            drained=not self._core.slots.in_flight,
            grace_s=grace_s,
            elapsed_s=round(self._clock() - began, 3),
            finished=sum(job.done.done() for job in running),
            running=sorted(job.task.task_id for job in self._jobs.values() if job.state == "running"),
            queued=self._core.waiting,
            paused=sum(len(ids) for ids in self._awaiting().values()),
            refused=self._shed[ErrorReason.DRAINING] - self._refused_before,
        )
        log.warning(
            "drained: %d ended, %d still running, %d queued in the backlog",
            report.finished,
            len(report.running),
            report.queued,
        )
        return report.model_dump(mode="json")

    async def restart_workers(self, grace_s: float) -> list[dict[str, Any]]:
        """Restarts the agent workers' processes one at a time (`WorkerFleet.restart_in_turn`):
        an upgrade's first step. Per worker: its name, new pid, how long it took, and how
        many of its tasks outlasted `grace_s` (they resume elsewhere from their checkpoints)."""
        log.warning("restarting the agent workers in turn (grace %.0fs each)", grace_s)
        return await self._fleet.restart_in_turn(grace_s)

    async def undrain(self) -> bool:
        """Takes work again after a drain; False if the pool was not draining."""
        if self._core.draining is None:
            return False
        self._core.undrain()
        log.warning("drain undone: taking work again")
        await self._note_drain(None)
        self._pump()
        return True

    def _drain_status(self) -> dict[str, float] | None:
        """The drain in progress, for `status()`: since how long, and the grace left (s)."""
        drain = self._core.draining
        if drain is None:
            return None
        now = self._clock()
        return {"for_s": round(now - drain.since, 3), "grace_left_s": round(max(0.0, drain.until - now), 3)}
