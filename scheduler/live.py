"""Changing a running pool's configuration (a mixin of `Scheduler`): `pool.update_config`.

The scheduler is where a change lands: it validates it, stores it in Redis with a new
version (`cluster.live_config`), applies it to itself (admission, fair shares, caps, the
queue bound, per-model dispatch), and hands it to the limiter (the buckets, keeping their
levels) and to every worker. A worker that missed it (restarted by Ray with its first
configuration, or started by the autoscaler) catches up when a dispatch carries a newer
version; the limiter, when the scheduler's tick finds it behind; the scheduler itself, at
boot. Only the fields in `LIVE_FIELDS` change this way; the rest need a restart.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

import ray

if TYPE_CHECKING:
    from agentpool.cluster.store import ResultStore
    from agentpool.config import PoolConfig
    from agentpool.scheduler.admission import Admission
    from agentpool.scheduler.core import SchedulerCore
    from agentpool.scheduler.fleet import WorkerFleet
    from agentpool.scheduler.jobs import Job

log = logging.getLogger("agentpool.scheduler")

#: How often the tick asks the limiter which version it applies.
_LIMITER_CHECK_S = 5.0
#: How long a change waits for the limiter and the workers to confirm it.
_PUSH_WAIT_S = 10.0


class LiveControl:
    """`update_config`, and catching up the limiter and the scheduler itself."""

    config: PoolConfig
    _core: SchedulerCore[Job]
    _admission: Admission
    _fleet: WorkerFleet
    _store: ResultStore
    _limiter: Any

    if TYPE_CHECKING:  # Scheduler's; declared here for the type checker only

        def _pump(self) -> None: ...

    def _init_live(self) -> None:
        #: The live configuration's version this scheduler applies (0: as it started).
        self._config_version = 0
        self._limiter_checked = 0.0
        #: One change at a time: each builds on the one before (no lost update).
        self._changing = asyncio.Lock()

    async def update_config(self, changes: dict[str, Any]) -> dict[str, Any]:
        """Applies `changes` to the live fields (`PoolConfig.with_live` validates them) across
        the pool. Returns the new version and who confirmed it: the limiter, and how many of
        the workers (the others catch up at their next dispatch)."""
        async with self._changing:
            config = self.config.with_live(changes)
            version = await self._store.live_config.save(config.live_fields())
            self._apply_live(config, version)
            limiter, workers = await asyncio.gather(self._push_limiter(), self._push_workers())
        log.warning("configuration version %d applied (%s)", version, ", ".join(sorted(changes)))
        return {"version": version, "changed": sorted(changes), "limiter": limiter, "workers": workers}

    def _apply_live(self, config: PoolConfig, version: int) -> None:
        self.config = config
        self._core.reconfigure(config)
        self._admission.config = config
        self._config_version = version
        self._pump()  # a cap or a bound may have risen

    async def _load_live(self) -> None:
        """At boot: the live configuration stored by an earlier `update_config`, if newer."""
        version, fields = await self._store.live_config.load()
        if version > self._config_version:
            self._apply_live(self.config.with_live(fields), version)
            log.warning("configuration version %d read back from Redis", version)

    async def _push_limiter(self) -> bool:
        """Hands the live configuration to the limiter; whether it confirmed it."""
        try:
            applied = await asyncio.wait_for(
                self._limiter.update_config.remote(self.config.live_fields(), self._config_version), _PUSH_WAIT_S
            )
        except (ray.exceptions.RayError, TimeoutError) as exc:
            log.warning("the limiter did not take configuration %d (%s)", self._config_version, exc)
            return False
        return int(applied) >= self._config_version

    async def _push_workers(self) -> dict[str, int]:
        """Hands the live configuration to every worker: how many confirmed it, of how many."""
        live, version = self.config.live_fields(), self._config_version
        fleet = self._fleet
        calls = [h.update_config.remote(live, version) for h, n in zip(fleet.handles, fleet.names, strict=True) if n]
        answers = await asyncio.gather(
            *(asyncio.wait_for(call, _PUSH_WAIT_S) for call in calls), return_exceptions=True
        )
        confirmed = sum(1 for a in answers if isinstance(a, int) and a >= version)
        return {"confirmed": confirmed, "workers": len(calls)}

    async def _tick_live(self) -> None:
        """Now and then: a limiter that Ray restarted with its first configuration catches up."""
        now = time.monotonic()
        if not self._config_version or now - self._limiter_checked < _LIMITER_CHECK_S:
            return
        self._limiter_checked = now
        try:
            status = await asyncio.wait_for(self._limiter.config_version.remote(), 1.0)
        except (ray.exceptions.RayError, TimeoutError):
            return
        if int(status) < self._config_version:
            await self._push_limiter()
