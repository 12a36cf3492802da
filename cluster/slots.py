"""Reads of streams that span tenants, on one server or a Redis Cluster.

On one server, one XREAD (or XREADGROUP) reads every stream at once and blocks for the
first entry. On a cluster every command must keep to one hash slot (a tenant's keys share
one: `{tenant}`), so the streams are read one slot at a time: every slot's streams without
blocking, in one pipeline (one round trip per node), and, when none has an entry, again
after a short pause until `block_ms` is over. The pause bounds what a cluster adds to the
wait for an entry (`POLL_S`); one slot's streams alone are read blocking, as on one server.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any

from redis.crc import key_slot

from agentpool.cluster.clients import is_cluster

#: How long a read across several slots of a cluster pauses between two rounds.
POLL_S = 0.02


def by_slot(streams: Mapping[Any, Any]) -> list[dict[Any, Any]]:
    """`streams` (key -> position) split by hash slot, in the order of their first key."""
    groups: dict[int, dict[Any, Any]] = {}
    for key, position in streams.items():
        raw = key.encode() if isinstance(key, str) else key
        groups.setdefault(key_slot(raw), {})[key] = position
    return list(groups.values())


def _merge(replies: list[Any]) -> list[Any]:
    """The replies of several XREADs as one XREAD's: [stream, entries] pairs (RESP2) or a
    dict of them (RESP3)."""
    out: list[Any] = []
    for reply in replies:
        if isinstance(reply, dict):
            out += [[k, v] for k, v in reply.items()]
        elif reply:
            out += list(reply)
    return out


def _deadline(block_ms: int | None) -> float:
    """When a read blocking `block_ms` gives up (BLOCK 0 waits for ever; None does not wait)."""
    if block_ms == 0:
        return float("inf")
    return time.monotonic() + (block_ms or 0) / 1000


def _groups(client: Any, streams: Mapping[Any, Any]) -> list[dict[Any, Any]]:
    return by_slot(streams) if is_cluster(client) else [dict(streams)]


def xread(client: Any, streams: Mapping[Any, Any], *, count: int, block_ms: int | None) -> list[Any]:
    """XREAD of `streams` with a blocking client (see the module docstring)."""
    groups = _groups(client, streams)
    if len(groups) == 1:
        return _merge([client.xread(groups[0], count=count, block=block_ms)])
    deadline = _deadline(block_ms)
    while True:
        pipe = client.pipeline(transaction=False)
        for group in groups:
            pipe.xread(group, count=count)
        found = _merge(pipe.execute())
        if found or time.monotonic() >= deadline:
            return found
        time.sleep(min(POLL_S, max(0.0, deadline - time.monotonic())))


async def axread(client: Any, streams: Mapping[Any, Any], *, count: int, block_ms: int | None) -> list[Any]:
    """XREAD of `streams` with an asyncio client (see the module docstring)."""
    return await _aread(
        client, streams, block_ms, lambda target, group, block: target.xread(group, count=count, block=block)
    )


async def axreadgroup(
    client: Any, group_name: str, consumer: str, streams: Mapping[Any, Any], *, count: int, block_ms: int | None
) -> list[Any]:
    """XREADGROUP of `streams` with an asyncio client (see the module docstring)."""

    def read(target: Any, group: dict[Any, Any], block: int | None) -> Any:
        return target.xreadgroup(group_name, consumer, group, count=count, block=block)

    return await _aread(client, streams, block_ms, read)


async def _aread(client: Any, streams: Mapping[Any, Any], block_ms: int | None, read: Any) -> list[Any]:
    groups = _groups(client, streams)
    if len(groups) == 1:
        return _merge([await read(client, groups[0], block_ms)])
    deadline = _deadline(block_ms)
    while True:
        pipe = client.pipeline(transaction=False)
        for group in groups:
            read(pipe, group, None)
        found = _merge(await pipe.execute())
        if found or time.monotonic() >= deadline:
            return found
        await asyncio.sleep(min(POLL_S, max(0.0, deadline - time.monotonic())))
