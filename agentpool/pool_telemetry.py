"""The pool handle's telemetry side: have every actor export now, list where each serves
Prometheus metrics, and report what the pool spent (a mixin of `AgentPool`, kept apart for
size)."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

import ray

if TYPE_CHECKING:
    from agentpool.config import PoolConfig


class PoolTelemetry:
    """`flush_telemetry` and `metrics_targets` over the pool's actors."""

    config: PoolConfig
    _redis_url: str

    if TYPE_CHECKING:  # AgentPool's; declared here for the type checker only

        def _by_name(self) -> dict[str, Any]: ...

        def _added_workers(self) -> list[Any]: ...

        def _check_running(self) -> None: ...

    def _telemetered(self) -> list[Any]:
        """The pool's actors that set up telemetry (all but the simulator and Redis hosts)."""
        actors = [*self._by_name().values(), *self._added_workers()]
        return [a for a in actors if hasattr(a, "flush_telemetry")]

    def flush_telemetry(self, timeout_s: float = 10.0) -> None:
        """Has every actor of the pool export its buffered spans and metrics now (`shutdown`
        does it before it stops them)."""
        refs = []
        for actor in self._telemetered():
            with contextlib.suppress(Exception):
                refs.append(actor.flush_telemetry.remote())
        if refs:
            ray.wait(refs, num_returns=len(refs), timeout=timeout_s)

    def metrics_targets(self) -> list[dict[str, Any]]:
        """Where the pool's processes serve `/metrics` (with `OTEL_METRICS_EXPORTER=prometheus`),
        as Prometheus file-based service discovery JSON: one group per actor role."""
        self._check_running()
        infos = []
        for actor in self._telemetered():
            with contextlib.suppress(Exception):
                infos.append(ray.get(actor.telemetry_info.remote(), timeout=10))
        groups: dict[str, list[str]] = {}
        for info in infos:
            if info.get("metrics_endpoint"):
                groups.setdefault(info["role"], []).append(info["metrics_endpoint"])
        return [
            {"targets": sorted(targets), "labels": {"agentpool_pool": self.config.name, "agentpool_role": role}}
            for role, targets in sorted(groups.items())
        ]

    def cost(self, days: int = 7, tenant: str | None = None) -> dict[str, Any]:
        """What the pool spent over the last `days` UTC days (today included), for one tenant
        or all: totals, by tenant, model and lane, and what the response cache and the batch
        lane saved against list prices (`agentpool.spend.summarise`; `agentpool cost`).

        Raises:
            redis.RedisError: If Redis cannot be reached.
        """
        import time

        from agentpool.cluster.clients import sync_client
        from agentpool.cluster.keys import Keys
        from agentpool.cluster.spend import days_back, read_spend
        from agentpool.spend import summarise

        self._check_running()
        period = days_back(max(1, min(days, 35)), time.time())
        with sync_client(self._redis_url, decode_responses=True) as client:
            raw = read_spend(client, Keys(self.config.key_prefix), period, [tenant] if tenant else None)
        return {"days": period, "tenant": tenant, **summarise(raw)}
