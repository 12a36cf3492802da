"""Load shedding in the scheduler: refusing work at the door from live state, and dropping
queued work that waited longer than it may. A mixin of `Scheduler`, kept apart for size;
the rules themselves are the pure `agentpool.scheduler.shedding`.

At the door, in order: the overload level (interactive work only), the predicted wait at the
tenant's fair share, scaled by how far recent forecasts fell short, against the task's
deadline, and the queue bound (evicting a lower class to make room).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

from agentpool.config import PoolConfig
from agentpool.errors import Overloaded
from agentpool.models import AgentTask
from agentpool.scheduler.capacity import ModelDispatch
from agentpool.scheduler.dispatch import LeastLoaded
from agentpool.scheduler.fair import FairQueue
from agentpool.scheduler.jobs import Job
from agentpool.scheduler.shedding import OverloadDetector, WaitCalibration, WaitForecast, sheds
from agentpool.vocabulary import ErrorReason


class LoadShedding:
    config: PoolConfig
    _queue: FairQueue[Job]
    _slots: LeastLoaded
    _models: ModelDispatch
    _detector: OverloadDetector
    _calibration: WaitCalibration
    _clock: Callable[[], float]
    _mean_run_s: float
    _waiting_total: int

    if TYPE_CHECKING:  # Scheduler's; declared here for the type checker only

        def _weight(self, tenant: str) -> float: ...

        def _tenant_has_room(self, tenant: str) -> bool: ...

    def _max_wait_s(self, task: AgentTask) -> float:
        """How long the task may wait in the queue: its deadline and the configured cap, if
        any; a task with neither waits its turn however long the backlog is."""
        limit = self.config.admission.max_queue_wait_s
        return min(limit or math.inf, task.deadline_s if task.deadline_s is not None else math.inf)

    def _forecast(self, task: AgentTask, key: str | None) -> WaitForecast:
        tenant = task.tenant
        backlogged = set(self._queue.backlogged()) | {tenant}
        share = self._weight(tenant) / sum(self._weight(t) for t in backlogged)
        rate = self._slots.capacity / max(self._mean_run_s, 1e-3)
        policy = self.config.policy_for(tenant)
        if policy is not None and policy.max_concurrency is not None:
            # A tenant at its concurrency cap is served no faster than its cap allows.
            share = min(share, policy.max_concurrency / max(self._mean_run_s, 1e-3) / rate)
        key_rate = self._models.tasks_per_s(key)
        if key_rate is not None:
            rate = min(rate, key_rate)  # a rate-limited model is served no faster than its limits allow
        return WaitForecast(self._queue.length(tenant, at_least=task.priority), share, rate)

    def _shed_or_make_room(self, job: Job, key: str | None) -> Overloaded | None:
        task = job.task
        now = self._clock()
        level = self._detector.level(now)
        if sheds(task.priority, level, task.deadline_s):
            return Overloaded(
                f"the pool is overloaded: {task.priority} work is shed until the queue drains",
                tenant=task.tenant,
                reason=ErrorReason.OVERLOAD,
                retry_after_s=self.config.admission.interval_s,
            )
        must_queue = (
            self._slots.in_flight >= self._slots.capacity
            or not self._tenant_has_room(task.tenant)
            or not self._models.has_room(key)
        )
        if must_queue or self._queue.length(task.tenant):
            forecast = self._forecast(task, key).seconds()
            limit = self._max_wait_s(task)
            if math.isfinite(limit):
                job.predicted_wait_s = forecast  # checked against the wait it gets
            # Forecasts fall short (later arrivals of higher priority or weight go first):
            # by as much as they have fallen short lately.
            wait = forecast * self._calibration.factor(now)
            if wait > limit:
                return Overloaded(
                    f"predicted queue wait {wait:.1f}s exceeds the {limit:.1f}s this task may wait",
                    tenant=task.tenant,
                    reason=ErrorReason.PREDICTED_WAIT,
                    retry_after_s=round(min(wait - limit, 3600.0), 3) if math.isfinite(wait) else 60.0,
                )
        if len(self._queue) + self._waiting_total >= self.config.max_queued:
            victim = self._queue.evict_for(task.tenant, task.priority)
            if victim is None:
                return Overloaded(
                    f"queue is full ({len(self._queue) + self._waiting_total} tasks waiting)",
                    tenant=task.tenant,
                    reason=ErrorReason.QUEUE_FULL,
                    retry_after_s=round(max(0.1, self._forecast(task, key).seconds()), 3),
                )
            self._drop(victim[1], ErrorReason.EVICTED, f"made room for {task.priority} work of another tenant")
        return None

    def _drop(self, job: Job, reason: str, why: str) -> None:
        """Ends a queued task with a rejection (its life writes the record)."""
        if not job.slot.done():
            job.slot.set_exception(
                Overloaded(
                    f"dropped from the queue: {why}",
                    tenant=job.task.tenant,
                    reason=reason,
                    retry_after_s=self.config.admission.interval_s,
                )
            )

    def _expire_waiting(self, now: float) -> None:
        oldest: float | None = None  # of the interactive work waiting: what the detector watches
        for tenant, _, job in self._queue.items():
            waited = now - job.enqueued_at
            if waited > job.max_wait_s:
                self._queue.remove(tenant, job)
                self._expire(job, waited, now)
            elif job.watched:
                oldest = waited if oldest is None else max(oldest, waited)
        if oldest is not None:
            self._detector.observe(oldest, now)
        else:
            self._detector.idle()

    def _expire(self, job: Job, waited: float, now: float) -> None:
        """Drops a task, out of the queue now, that waited longer than it may."""
        self._calibrate(job, waited, now)
        self._drop(job, ErrorReason.QUEUE_TIMEOUT, f"waited {waited:.1f}s, longer than its {job.max_wait_s:.1f}s")

    def _calibrate(self, job: Job, waited: float, now: float) -> None:
        """Reports a forecast task's wait (once: at dispatch, or when it is dropped)."""
        if job.predicted_wait_s is not None:
            self._calibration.observe(job.predicted_wait_s, waited, now)
            job.predicted_wait_s = None
