"""Hosts the embedded Redis inside the Ray cluster, for a detached pool: the server then
lives as long as the pool's actors, not as long as the process that started them."""

from __future__ import annotations

import ray

from agentpool.cluster.redis_server import EmbeddedRedis


@ray.remote
class RedisHost:
    """An actor owning one `EmbeddedRedis` (which dies with the actor's process)."""

    def __init__(self) -> None:
        self._server = EmbeddedRedis(die_with_parent=True)

    def start(self) -> str:
        return self._server.start()

    def stop(self) -> None:
        self._server.stop()
