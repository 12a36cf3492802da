"""What the scheduler tells about the pool: `status()`, and the signals each task's end gives
(metrics, alerts, error counts). A mixin of `Scheduler`, kept apart for size."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

import ray
from redis.exceptions import RedisError

from agentpool import events
from agentpool import telemetry as tm
from agentpool.models import AgentResult
from agentpool.scheduler.alerts import AlertMonitor
from agentpool.scheduler.jobs import Job
from agentpool.vocabulary import TaskStatus

if TYPE_CHECKING:
    from agentpool.cluster.store import ResultStore
    from agentpool.scheduler.observe import TaskTelemetry

log = logging.getLogger("agentpool.alerts")
#: Tenants whose task ends `status()` counts, at most.
_MAX_TENANTS = 10_000


class StatusView:
    """`status()` and `_observe_end()`."""

    _store: ResultStore
    _telemetry: TaskTelemetry
    _alerts: AlertMonitor
    _ends: dict[str, Counter[TaskStatus]]

    def _observe_end(self, job: Job, result: AgentResult | None) -> None:
        """Counts a task's end: its spans and metrics, its tenant's errors, and any alert."""
        self._telemetry.ended(job, result)
        if result is None:
            return
        tenant = result.tenant
        ends = self._ends.pop(tenant, None) or Counter()
        ends[result.status] += 1
        self._ends[tenant] = ends  # most recently ended last: the first to go beyond the bound
        if len(self._ends) > _MAX_TENANTS:
            del self._ends[next(iter(self._ends))]
        if not self._alerts.enabled:
            return
        raised = self._alerts.observe(
            tenant, result.task_id, result.status, result.timings.total_ms / 1000, result.usage.cost_usd, time.time()
        )
        for alert in raised:
            event = events.Alert(kind=alert.kind, state=alert.state, value=alert.value, threshold=alert.threshold)
            tm.alerts.add(
                1, {"agentpool.tenant": tenant, "agentpool.alert": alert.kind, "agentpool.state": alert.state}
            )
            log.warning(
                "alert %s %s for tenant %s: %s (threshold %s)",
                alert.kind,
                alert.state,
                tenant,
                alert.value,
                alert.threshold,
            )
            self._store.post(tenant, event, task_id=alert.task_id or "", trace_id=result.trace_id)

    async def status(self: Any) -> dict[str, Any]:
        """Queues, in-flight work, shedding, errors and alerts, the global buckets, the tools'
        breakers and today's spend per tenant."""
        await self._loaded.wait()
        now, core = self._clock(), self._core
        try:
            limits = await self._limiter.status.remote()
        except ray.exceptions.RayError as exc:
            limits = {"error": f"rate limiter unavailable: {type(exc).__name__}"}
        tools: dict[str, Any] = {}
        if self._board is not None:
            try:
                tools = await self._board.status.remote()
            except ray.exceptions.RayError as exc:
                tools = {"error": f"tool board unavailable: {type(exc).__name__}"}
        tenants = dict.fromkeys([*self.config.tenants, *self._seen])
        backlog, (reachable, error) = await asyncio.gather(self._redis_backlog(), self._store.reachable())
        return {
            "queued": core.waiting,
            "queued_by_tenant": _merged(core.queue.depth(), self._backlog_depth()),
            # Of `queued`: the tasks waiting in the Redis backlog only (not in memory).
            "queued_in_redis": core.outside,
            "jobs_in_memory": len(self._jobs) + len(self._deferred),
            "in_flight": core.slots.in_flight,
            "in_flight_by_tenant": dict(core.running),
            "capacity": core.slots.capacity,
            "worker_load": list(core.slots.load),
            "workers": self._fleet.snapshot(),
            "finished_by_status": dict(self._counts),
            "awaiting_approval": self._awaiting(),
            # A drain in progress (`pool.drain`): since how long, and the grace left; else None.
            "draining": self._drain_status(),
            # The live configuration's version applied (`pool.update_config`; 0: as started).
            "config_version": self._config_version,
            "durability": {**self._durable, "jobs": len(self._jobs), **backlog},
            "redis": {
                "reachable": reachable,
                "error": error,
                "pending_writes": backlog["pending_writes"],
                "pending_events": backlog["pending_events"],
                # Admissions and records fewer replicas confirmed than `redis_wait_replicas`.
                "unreplicated": backlog["unreplicated"],
                "unreachable_since_unix": self._store.unreachable_since,
            },
            "shed_by_reason": dict(self._shed),
            "finished_by_tenant": {t: dict(c) for t, c in self._ends.items()},
            "errors_by_tenant": {t: sum(n for s, n in c.items() if s.is_error) for t, c in self._ends.items()},
            "alerts_firing": self._alerts.firing(),
            "overload_level": core.detector.level(now),
            # How much longer than forecast queue waits have lately been (admission scales by it).
            "wait_forecast_factor": round(core.calibration.pooled.factor(now), 3),
            "wait_forecast_factor_by_priority": {
                p: round(core.calibration.factor(p, now), 3) for p in core.calibration.by_class
            },
            "dispatch_per_s": round(core.rate.per_s(now), 3),
            "mean_run_s": round(core.mean_run_s, 4),
            "model_capacity": core.models.snapshot(),
            "loop_lag_ms": round(self._loop_lag_s * 1000, 1),
            "fair_counters": {t: round(c, 1) for t, c in core.queue.counters.items() if t in tenants},
            "limits": limits,
            "tools": tools,
            "budgets_today": await self._budgets_today(tenants),
            # Rollouts of agents' versions in this pool (live or ended): see `pool.rollouts`.
            "rollouts": self._agents.status(),
        }

    async def ready(self: Any) -> dict[str, Any]:
        """Whether the pool can take work now (`GET /readyz`): workers reachable and Redis
        answering."""
        reachable, error = await self._store.reachable()
        return {
            "workers": self._core.slots.open_count,
            "capacity": self._core.slots.capacity,
            "redis": reachable,
            "redis_error": error,
        }

    async def _budgets_today(self: Any, tenants: dict[str, None]) -> dict[str, Any]:
        try:
            return dict(await self._ledger.usage_today(tenants))
        except (RedisError, OSError) as exc:  # status must answer while Redis is away
            return {"error": f"Redis unavailable: {type(exc).__name__}"}


def _merged(a: dict[str, dict[str, int]], b: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    """Counts per tenant and class, added up."""
    out = {tenant: dict(classes) for tenant, classes in a.items()}
    for tenant, classes in b.items():
        mine = out.setdefault(tenant, {})
        for priority, count in classes.items():
            mine[priority] = mine.get(priority, 0) + count
    return out
