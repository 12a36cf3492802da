"""One task at a time per session, in the scheduler (a mixin of `Scheduler`, kept apart for
size): a session's task takes its session's turn before it is queued for a worker, and
gives it back when it ends, whatever ended it; and a session's deletion.

The scheduler is the one place every task of a pool passes, so the turn is held there (in
memory): a worker that dies leaves no lock behind (its task keeps the turn while it runs
again elsewhere, and gives it back when it ends), and a scheduler that restarts takes its
accepted tasks back in their order. Redis only checks, as the turns are stored, that no two
runs ever interleave (`cluster.records`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any

from redis.exceptions import RedisError

from agentpool import events
from agentpool.errors import SessionBusy
from agentpool.models import AgentResult
from agentpool.scheduler.jobs import Job
from agentpool.scheduler.turns import SessionTurns, Turn
from agentpool.vocabulary import ErrorReason, OnBusy, TaskStatus

if TYPE_CHECKING:
    from agentpool.background import Background
    from agentpool.cluster.store import ResultStore

log = logging.getLogger("agentpool.scheduler")

#: What a rejected task of a busy session is told to wait before it tries again.
_BUSY_RETRY_S = 1.0
#: How long a task sent after others of its session waits for them to arrive, at most.
_HOLD_S = 5.0
#: Session tasks remembered as arrived (for the tasks sent after them).
_ARRIVED_KEPT = 100_000

SessionKey = tuple[str, str]


class CancelledWaiting(Exception):
    """A task waiting for its session's turn was cancelled there."""


class SessionGate:
    """`_session_turn` before a session's task is queued, `_release_turn` as it ends."""

    _jobs: dict[str, Job]
    _deferred: dict[str, Job]
    _store: ResultStore
    _lives: Background

    if TYPE_CHECKING:  # Scheduler's; declared here for the type checker only

        async def _reject(self, task: Any, trace_id: str, error: Any, arrived_unix: float) -> AgentResult: ...

        async def _cancelled(self, job: Job) -> AgentResult: ...

        async def cancel(
            self, task_id: str, reason: str = ..., interrupted: OnBusy | None = None
        ) -> AgentResult | None: ...

    def _init_sessions(self) -> None:
        self._turns: SessionTurns[SessionKey, Job] = SessionTurns()
        #: Session tasks that took their place lately (what a later one sent after them
        #: looks for), oldest first, at most `_ARRIVED_KEPT`.
        self._arrived: dict[str, None] = {}
        #: Jobs held until a task they were sent after takes its place, by that task's id.
        self._held: dict[str, list[Job]] = {}

    def _arrive(self, job: Job) -> None:
        """Takes the job's place in its session's line as it arrives (before anything else
        of it is awaited). A task sent after others of its session in one call (`after`:
        Ray does not keep the order of an async actor's calls) first waits, at most
        `_HOLD_S`, for them to take theirs."""
        task = job.task
        if task.session_id is None:
            return
        missing = next((t for t in job.after if t not in self._arrived), None)
        if missing is not None and job.held is None and not job.done.done():
            job.held = asyncio.get_running_loop().call_later(_HOLD_S, self._take_place, job)
            self._held.setdefault(missing, []).append(job)
            return
        self._take_place(job)

    def _take_place(self, job: Job) -> None:
        if job.arrival is not None or job.done.done():
            return
        self._unhold(job)
        task = job.task
        job.arrival = self._turns.arrive((task.tenant, task.session_id or ""), job, task.on_busy)
        if job.placed is not None and not job.placed.done():
            job.placed.set_result(None)
        self._arrived[task.task_id] = None
        if len(self._arrived) > _ARRIVED_KEPT:
            del self._arrived[next(iter(self._arrived))]
        for follower in self._held.pop(task.task_id, []):
            if follower.arrival is None:
                self._unhold(follower)
                self._arrive(follower)

    def _unhold(self, job: Job) -> None:
        """Stops holding the job for the tasks sent before it (its timer, its entry)."""
        if job.held is not None:
            job.held.cancel()
            job.held = None
        for predecessor in job.after:
            held = self._held.get(predecessor)
            if held is not None and job in held:
                held.remove(job)
                if not held:
                    del self._held[predecessor]

    async def _session_turn(self, job: Job) -> AgentResult | None:
        """Waits until the job's session is its to run (None), or returns the record that
        ends it instead: rejected (`on_busy="reject"` and the session is busy), or
        cancelled while it waited. Called once the job is admitted."""
        task = job.task
        if task.session_id is None:
            return None
        began = time.monotonic()
        try:
            return await self._wait_turn(job)
        finally:
            job.session_wait_s = time.monotonic() - began

    async def _wait_turn(self, job: Job) -> AgentResult | None:
        task = job.task
        assert task.session_id is not None
        if job.arrival is None:  # held until the tasks sent before it take their places
            job.placed = asyncio.get_running_loop().create_future()
            await job.placed
        arrival = job.arrival
        assert arrival is not None
        if arrival.turn == Turn.REJECT:
            running = arrival.holder.task.task_id if arrival.holder is not None else "?"
            busy = SessionBusy(
                f"session {task.session_id!r} is running task {running}",
                retry_after_s=_BUSY_RETRY_S,
                reason=ErrorReason.SESSION_BUSY,
            )
            return await self._reject(task, job.trace_id, busy, job.admitted_unix)
        key = (task.tenant, task.session_id)
        holder = self._turns.holder(key)
        if holder is job or holder is None:  # its turn came while it was being admitted
            return None
        job.state = "waiting"
        job.turn = asyncio.get_running_loop().create_future()
        if not job.accepted.done():  # accepted: it waits in the scheduler, in its session's line
            job.accepted.set_result(None)
        waiting = events.SessionWait(session_id=task.session_id, behind=holder.task.task_id)
        self._store.post(task.tenant, waiting, task_id=task.task_id, trace_id=job.trace_id)
        if arrival.turn == Turn.PREEMPT:
            reason = f"interrupted by task {task.task_id} of session {task.session_id}"
            self._lives.spawn(self.cancel(holder.task.task_id, reason, interrupted=task.on_busy))
        try:
            await job.turn
        except CancelledWaiting:
            return await self._cancelled(job)
        finally:
            job.turn = None
        return None

    def _release_turn(self, job: Job) -> None:
        """The job ended (or left its line): the next task of its session gets the turn."""
        task = job.task
        if task.session_id is None:
            return
        self._unhold(job)
        following = self._turns.leave((task.tenant, task.session_id), job)
        if following is not None and following.turn is not None and not following.turn.done():
            following.turn.set_result(None)

    def _cancel_waiting(self, job: Job) -> bool:
        """Cancels a job that waits for its session's turn; False if it does not wait."""
        if job.turn is None or job.turn.done():
            return False
        self._turns.leave((job.task.tenant, job.task.session_id or ""), job)
        job.turn.set_exception(CancelledWaiting())
        return True

    def session_place(self, job: Job) -> int | None:
        """How many of its session's tasks go before a waiting job."""
        task = job.task
        if task.session_id is None:
            return None
        return self._turns.place((task.tenant, task.session_id), job)

    async def delete_session(self, tenant: str, session_id: str) -> dict[str, Any]:
        """Cancels the session's tasks (waiting, queued, running or paused) and deletes the
        session with everything of its tasks (`SessionStore.erase`). Returns what went."""
        reason = f"session {session_id} is being deleted"
        live = [
            job.task.task_id
            for job in (*self._jobs.values(), *self._deferred.values())
            if job.task.tenant == tenant and job.task.session_id == session_id
        ]

        def holds_turn(task_id: str) -> bool:
            job = self._jobs.get(task_id)
            return job is not None and self.session_place(job) == 0

        live.sort(key=holds_turn)  # the waiting first: none of them may take the turn as the holder ends
        cancelled = 0
        for task_id in live:
            with contextlib.suppress(RedisError, OSError):
                ended = await self.cancel(task_id, reason)
                cancelled += ended is not None and ended.status == TaskStatus.CANCELLED
        erased = await self._store.sessions.erase(tenant, session_id)
        return {**erased.as_dict(), "cancelled": cancelled}

    async def delete_sessions(self, tenant: str) -> dict[str, Any]:
        """Deletes every session of the tenant (`delete_session`, one by one)."""
        totals: dict[str, Any] = {"tenant": tenant, "sessions": 0}
        ids = set(await self._store.sessions.session_ids(tenant))
        ids |= {j.task.session_id for j in self._jobs.values() if j.task.tenant == tenant and j.task.session_id}
        for session_id in sorted(ids):
            report = await self.delete_session(tenant, session_id)
            totals["sessions"] += 1
            for field in ("tasks", "keys_deleted", "stream_entries_deleted", "messages_deleted", "cancelled"):
                totals[field] = totals.get(field, 0) + report[field]
        return totals
