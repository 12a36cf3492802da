"""Hosts the simulated provider inside the cluster, so every worker process can reach it."""

from __future__ import annotations

import ray

from agentpool import heap
from agentpool.simulator import SimulatorConfig, SimulatorServer


@ray.remote
class SimulatorHost:
    """An async actor serving the simulator on its own event loop."""

    def __init__(self, config: SimulatorConfig) -> None:
        self._server = SimulatorServer(config)
        heap.settle()

    async def start(self) -> str:
        return await self._server.start_async()

    def stats(self) -> dict[str, object]:
        return self._server.sim.stats_json()

    async def stop(self) -> None:
        await self._server.stop_async()
