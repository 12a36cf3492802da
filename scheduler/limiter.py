"""The rate-limiter actor: one per pool, so the buckets are global across every worker.

`PermitService` is the asyncio shell around the pure `PermitBroker`: it turns waiting
requests into futures and wakes itself with a timer when the buckets will cover the next
one. The `RateLimiter` actor is a thin Ray shell around it. Workers `await acquire` before
every LLM attempt (retries included) and `release` after it without waiting for a reply.
"""

from __future__ import annotations

import asyncio
import os
import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import ray

from agentpool import heap
from agentpool.cluster.telemetry import Telemetered
from agentpool.config import PoolConfig
from agentpool.scheduler.capacity import LimiterBacklog
from agentpool.scheduler.permits import PermitBroker, PermitRequest


def _policies(config: PoolConfig) -> dict[str, Any]:
    """What the broker reads of a configuration's limits and tenants (`PermitBroker` and
    `PermitBroker.retune` take these as keywords)."""

    def tenant_limits(tenant: str) -> dict[str, int]:
        policy = config.policy_for(tenant)
        return policy.limits.per_minute() if policy is not None else {}

    def tenant_weight(tenant: str) -> float:
        policy = config.policy_for(tenant)
        return policy.weight if policy is not None else 1.0

    return {
        "model_limits": {key: limit.per_minute() for key, limit in config.limits.items()},
        "limit_key": config.limit_key,
        "tenant_limits": tenant_limits,
        "tenant_weight": tenant_weight,
    }


def broker_for(config: PoolConfig, now: float, *, full: bool) -> PermitBroker:
    return PermitBroker(
        **_policies(config),
        lease_ttl_s=config.lease_expiry_s,
        now=now,
        full=full,
        output_reservation=config.output_reservation,
        margin_s=config.limit_margin_s,
    )


class PermitService:
    """Futures and a wake-up timer around a `PermitBroker`; one event loop, no locks needed."""

    def __init__(self, broker: PermitBroker, clock: Callable[[], float] = time.monotonic) -> None:
        self.broker = broker
        self._clock = clock
        self._futures: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._timer: asyncio.TimerHandle | None = None

    async def acquire(self, request: PermitRequest) -> dict[str, Any]:
        """Waits for a lease; if the wait is cancelled, nothing stays reserved."""
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._futures[request.lease_id] = future
        self.broker.request(request, self._clock())
        self._pump()
        try:
            return await future
        except asyncio.CancelledError:
            self.cancel(request.lease_id)
            raise

    def release(
        self,
        lease_id: str,
        *,
        usage: Mapping[str, float] | None = None,
        remaining: Mapping[str, float] | None = None,
        retry_after_s: float | None = None,
        model: str | None = None,
    ) -> bool:
        now = self._clock()
        if retry_after_s is not None and model is not None:
            self.broker.pause(model, now + retry_after_s)
        released = self.broker.release(lease_id, now, usage=usage, remaining=remaining) is not None
        self._pump()
        return released

    def cancel(self, lease_id: str) -> bool:
        future = self._futures.pop(lease_id, None)
        if future is not None and not future.done():
            future.cancel()
        cancelled = self.broker.cancel(lease_id, self._clock())
        self._pump()
        return cancelled

    def _pump(self) -> None:
        now = self._clock()
        self.broker.expire(now)
        for lease in self.broker.grant_ready(now):
            future = self._futures.pop(lease.lease_id, None)
            if future is None or future.done():  # its caller is gone: give the capacity back
                self.broker.release(lease.lease_id, now, usage=None)
                continue
            future.set_result(lease.as_dict())
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        wake = self.broker.next_wake_s(now)
        if wake is not None:
            self._timer = asyncio.get_running_loop().call_later(max(wake, 0.0005), self._pump)

    def status(self) -> dict[str, Any]:
        return self.broker.snapshot(self._clock())

    def backlog(self) -> LimiterBacklog:
        return LimiterBacklog(self.broker.waiting_by_key(), self.broker.levels(self._clock()))

    def wake(self) -> None:
        """Grants what fits now (after the buckets changed)."""
        self._pump()


def _restarted() -> bool:
    """Whether Ray restarted this actor. (Ray's own property reads the deprecated
    `actor_id` and warns: a line in the driver's output at every pool start.)"""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="(?s).*Use get_actor_id", category=DeprecationWarning)
        return bool(ray.get_runtime_context().was_current_actor_reconstructed)


@ray.remote
class RateLimiter(Telemetered):
    """Named async actor holding the pool's global buckets and its lease table."""

    def __init__(self, config: PoolConfig) -> None:
        self._setup_telemetry("limiter")
        # After a restart our view of the provider's buckets is gone: start them empty rather
        # than full, so a crash can never grant a burst the provider has already served.
        restarted = _restarted()
        self._service = PermitService(broker_for(config, time.monotonic(), full=not restarted))
        self.restarted = restarted
        self._config = config
        #: The live configuration's version applied (`pool.update_config`); 0: as started.
        self._version = 0
        heap.settle()

    def pid(self) -> int:
        """This actor's process id (an upgrade checks its restart by it)."""
        return os.getpid()

    def config_version(self) -> int:
        """The live configuration's version applied (what the scheduler's tick checks)."""
        return self._version

    def update_config(self, live: dict[str, Any], version: int) -> int:
        """Applies the live configuration `version` (limits and tenants' policies) to the
        buckets, keeping their levels and every lease and waiter; an older one is ignored.
        Returns the version now applied."""
        if version > self._version:
            self._config = self._config.with_live(live)
            self._service.broker.retune(**_policies(self._config), now=time.monotonic())
            self._service.wake()
            self._version = version
        return self._version

    @ray.method(enable_task_events=False)  # see `Scheduler.run`
    async def acquire(
        self,
        lease_id: str,
        tenant: str,
        model: str,
        input_tokens: int,
        max_tokens: int,
        holder: str = "",
        priority: str = "standard",
    ) -> dict[str, Any]:
        request = PermitRequest(lease_id, tenant, model, input_tokens, max_tokens, holder, priority)
        return await self._service.acquire(request)

    @ray.method(enable_task_events=False)  # see `Scheduler.run`
    def release(
        self,
        lease_id: str,
        usage: dict[str, float] | None = None,
        remaining: dict[str, float] | None = None,
        retry_after_s: float | None = None,
        model: str | None = None,
    ) -> bool:
        return self._service.release(
            lease_id, usage=usage, remaining=remaining, retry_after_s=retry_after_s, model=model
        )

    @ray.method(enable_task_events=False)  # see `Scheduler.run`
    def cancel(self, lease_id: str) -> bool:
        return self._service.cancel(lease_id)

    def status(self) -> dict[str, Any]:
        return {**self._service.status(), "restarted": self.restarted, "config_version": self._version}

    def backlog(self) -> LimiterBacklog:
        """Calls waiting for a permit and the buckets' levels per limit key: what the scheduler
        polls at each tick, without a full snapshot."""
        return self._service.backlog()
