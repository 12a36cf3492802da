"""Redis clients from a URL (`agentpool.redis_url`): one server (`redis://`, `rediss://`,
`unix://`); the primary a Sentinel group watches (`redis+sentinel://`,
`rediss+sentinel://`), found through the sentinels and followed through a failover (a
connection to a demoted primary is dropped and the next one goes to the new primary); or
a Redis Cluster (`redis+cluster://`, `rediss+cluster://`), whose client sends each command
to the node serving its key's slot and follows the slots when they move or a replica takes
over. A cluster client answers the same commands as a one-server client (and is typed as
one here); what differs is that every command, script and transaction must touch keys of
one slot (`agentpool.cluster.slots` groups keys by slot where a read spans tenants)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, cast

import redis
import redis.asyncio as aioredis
import redis.asyncio.cluster as async_cluster
import redis.asyncio.sentinel as async_sentinel
import redis.cluster as sync_cluster
import redis.sentinel as sync_sentinel
from redis.exceptions import RedisClusterUnreachableError, SlotNotCoveredError

from agentpool.redis_url import cluster_target, sentinel_target

#: Connection options a cluster client does not take (it makes its own pool per node).
_NOT_FOR_CLUSTERS = ("db", "connection_pool", "single_connection_client")


#: What a cluster client raises while slots have no node (a primary died and no replica has
#: taken over yet, or no node answers): to the pool, as to a one-server client, Redis is
#: away for now.
_CLUSTER_AWAY = (SlotNotCoveredError, RedisClusterUnreachableError)


@contextlib.contextmanager
def cluster_away_as_connection_error() -> Iterator[None]:
    """Raises `redis.ConnectionError` (a `RedisError`, what every caller of a one-server
    client handles) for a cluster client's errors of slots without a node."""
    try:
        yield
    except _CLUSTER_AWAY as exc:
        raise redis.ConnectionError(f"Redis Cluster: {exc}") from exc


class _AsyncCluster(async_cluster.RedisCluster):
    """An asyncio cluster client whose commands and pipelines raise `redis.ConnectionError`
    while slots have no node (`cluster_away_as_connection_error`)."""

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        with cluster_away_as_connection_error():
            return await super().execute_command(*args, **kwargs)

    def pipeline(self, transaction: Any = None, shard_hint: Any = None) -> Any:
        pipe = super().pipeline(transaction, shard_hint)
        execute = pipe.execute

        async def guarded(*args: Any, **kwargs: Any) -> Any:
            with cluster_away_as_connection_error():
                return await execute(*args, **kwargs)

        pipe.execute = guarded  # type: ignore[method-assign]  # the one method that sends
        return pipe


class _SyncCluster(sync_cluster.RedisCluster):
    """The blocking client's counterpart of `_AsyncCluster`."""

    def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        with cluster_away_as_connection_error():
            return super().execute_command(*args, **kwargs)

    def pipeline(self, transaction: Any = None, shard_hint: Any = None) -> Any:
        pipe = super().pipeline(transaction, shard_hint)
        execute = pipe.execute

        def guarded(*args: Any, **kwargs: Any) -> Any:
            with cluster_away_as_connection_error():
                return execute(*args, **kwargs)

        pipe.execute = guarded  # the one method that sends (a plain attribute here)
        return pipe


def is_cluster(client: Any) -> bool:
    """Whether `client` talks to a Redis Cluster (sync or asyncio)."""
    return isinstance(client, async_cluster.RedisCluster | sync_cluster.RedisCluster)


def _cluster_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in kwargs.items() if k not in _NOT_FOR_CLUSTERS}


def async_client(url: str, *, max_connections: int | None = None, **kwargs: Any) -> aioredis.Redis:
    """An asyncio client for `url` (see the module docstring); `kwargs` go to its connections."""
    nodes = cluster_target(url)
    if nodes is not None:
        if max_connections is not None:
            kwargs["max_connections"] = max_connections  # per node
        client = _AsyncCluster(
            startup_nodes=[async_cluster.ClusterNode(host, port) for host, port in nodes.nodes],
            **nodes.node_kwargs(),
            **_cluster_kwargs(kwargs),
        )
        return cast(aioredis.Redis, client)
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
    connections (a blocking pool) on one server; on a Sentinel-watched primary or a cluster,
    a client of as many connections (per node, on a cluster: their pools do not block)."""
    if sentinel_target(url) is not None or cluster_target(url) is not None:
        return async_client(url, max_connections=max_connections, **kwargs)
    pool = aioredis.BlockingConnectionPool.from_url(url, max_connections=max_connections, timeout=timeout_s, **kwargs)
    return aioredis.Redis(connection_pool=pool)


def sync_client(url: str, **kwargs: Any) -> redis.Redis:
    """A blocking client for `url` (see the module docstring); `kwargs` go to its connections."""
    nodes = cluster_target(url)
    if nodes is not None:
        client = _SyncCluster(
            startup_nodes=[sync_cluster.ClusterNode(host, port) for host, port in nodes.nodes],
            **nodes.node_kwargs(),
            **_cluster_kwargs(kwargs),
        )
        return cast(redis.Redis, client)
    target = sentinel_target(url)
    if target is None:
        return redis.Redis.from_url(url, **kwargs)
    timeout = float(kwargs.get("socket_connect_timeout") or 5.0)
    manager = sync_sentinel.Sentinel(target.sentinels, sentinel_kwargs=target.sentinel_kwargs(timeout))
    return manager.master_for(target.service, redis_class=redis.Redis, **target.node_kwargs(), **kwargs)
