"""Redis clients from a URL (`agentpool.redis_url`): one server (`redis://`, `rediss://`,
`unix://`), or the primary a Sentinel group watches (`redis+sentinel://`,
`rediss+sentinel://`), found through the sentinels and followed through a failover (a
connection to a demoted primary is dropped and the next one goes to the new primary)."""

from __future__ import annotations

from typing import Any

import redis
import redis.asyncio as aioredis
import redis.asyncio.sentinel as async_sentinel
import redis.sentinel as sync_sentinel

from agentpool.redis_url import sentinel_target


def async_client(url: str, *, max_connections: int | None = None, **kwargs: Any) -> aioredis.Redis:
    """An asyncio client for `url` (see the module docstring); `kwargs` go to its connections."""
    target = sentinel_target(url)
    if target is None:
        return aioredis.Redis.from_url(url, max_connections=max_connections, **kwargs)
    timeout = float(kwargs.get("socket_connect_timeout") or 5.0)
    manager = async_sentinel.Sentinel(target.sentinels, sentinel_kwargs=target.sentinel_kwargs(timeout))
    if max_connections is not None:
        kwargs["max_connections"] = max_connections
    return manager.master_for(target.service, redis_class=aioredis.Redis, **target.node_kwargs(), **kwargs)


def async_pool(url: str, *, max_connections: int, timeout_s: float, **kwargs: Any) -> aioredis.Redis:
    """An asyncio client whose callers wait up to `timeout_s` for one of `max_connections`
    connections (a blocking pool) on one server; on a Sentinel-watched primary, a client
    of as many connections (redis-py's Sentinel pools do not block)."""
    if sentinel_target(url) is not None:
        return async_client(url, max_connections=max_connections, **kwargs)
    pool = aioredis.BlockingConnectionPool.from_url(url, max_connections=max_connections, timeout=timeout_s, **kwargs)
    return aioredis.Redis(connection_pool=pool)


def sync_client(url: str, **kwargs: Any) -> redis.Redis:
    """A blocking client for `url` (see the module docstring); `kwargs` go to its connections."""
    target = sentinel_target(url)
    if target is None:
        return redis.Redis.from_url(url, **kwargs)
    timeout = float(kwargs.get("socket_connect_timeout") or 5.0)
    manager = sync_sentinel.Sentinel(target.sentinels, sentinel_kwargs=target.sentinel_kwargs(timeout))
    return manager.master_for(target.service, redis_class=redis.Redis, **target.node_kwargs(), **kwargs)
