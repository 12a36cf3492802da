"""What one replica of the HTTP API holds: the pool's scheduler (found by name), an async
Redis client for records, events, keys and idempotency, and its own metrics."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import ray
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from agentpool.cluster.api_keys import ApiKeys
from agentpool.cluster.clients import async_pool
from agentpool.cluster.front import FrontStore
from agentpool.cluster.keys import Keys
from agentpool.cluster.sessions import SessionStore
from agentpool.cluster.webhook_store import WebhookStore
from agentpool.config import HttpConfig, PoolConfig
from agentpool.errors import PoolNotRunning
from agentpool.launch import NAMESPACE


class Metrics:
    """The replica's own Prometheus metrics (`GET /metrics`)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "agentpool_http_requests", "HTTP requests served", ["method", "route", "code"], registry=self.registry
        )
        self.latency = Histogram(
            "agentpool_http_request_duration_seconds",
            "Time to the response's first byte",
            ["method", "route"],
            registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )
        self.streams = Gauge("agentpool_http_sse_streams", "SSE streams open", registry=self.registry)
        self.pool = Gauge("agentpool_pool_state", "The pool's queues and slots", ["what"], registry=self.registry)


class Gateway:
    """The pool as one replica of the API sees it (made at the replica's start)."""

    def __init__(self, scheduler: Any, config: PoolConfig, redis_url: str, tools: frozenset[str] | None) -> None:
        self.scheduler = scheduler
        self.config = config
        self.http: HttpConfig = config.http
        self.tools = tools
        # A bounded pool that makes a request wait for a connection (the default pool refuses
        # past 100): a thousand SSE streams and their requests share a few dozen connections.
        self.redis = async_pool(
            redis_url, max_connections=64, timeout_s=30, decode_responses=True, socket_connect_timeout=5
        )
        keys = Keys(config.key_prefix)
        self.store = FrontStore(self.redis, keys)
        self.api_keys = ApiKeys(self.redis, keys)
        self.webhooks = WebhookStore(self.redis, keys, config.name)
        self.sessions = SessionStore(lambda: self.redis, keys, pool=config.name)
        self.metrics = Metrics()
        self.started = time.time()

    @classmethod
    async def connect(cls, pool: str) -> Gateway:
        """Finds the pool named `pool` on this Ray cluster (the replica runs inside it).

        Raises:
            PoolNotRunning: If it has no scheduler of that name.
        """
        try:
            scheduler = ray.get_actor(f"{pool}-scheduler", namespace=NAMESPACE)
        except ValueError:
            raise PoolNotRunning(f"no pool named {pool!r} is running on this cluster") from None
        info: dict[str, Any] = await scheduler.info.remote()
        config = PoolConfig.model_validate(info["config"])
        tools = info.get("tools")
        return cls(scheduler, config, info["redis_url"], None if tools is None else frozenset(tools))

    async def close(self) -> None:
        await self.redis.aclose(close_connection_pool=True)

    async def ready(self, timeout_s: float = 2.0) -> dict[str, Any]:
        """The scheduler's answer (workers, Redis) and this replica's Redis, within `timeout_s`."""
        try:
            async with asyncio.timeout(timeout_s):
                state: dict[str, Any] = await self.scheduler.ready.remote()
                await self.redis.ping()
        except (TimeoutError, ray.exceptions.RayError, OSError, aioredis.RedisError) as exc:
            return {"ready": False, "error": f"{type(exc).__name__}: {exc}"[:300]}
        ok = bool(state["redis"]) and state["workers"] > 0
        return {"ready": ok, **state}
