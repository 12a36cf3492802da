"""Redis URLs: which name one server, which a primary that Sentinel watches and which a
Redis Cluster, and the parts of the last two (see `cluster.clients`, which makes clients
from them):

    redis+sentinel://[[user]:password@]host1:26379,host2:26379,host3:26379/mymaster[/0]
    redis+cluster://[[user]:password@]node1:6379,node2:6379,node3:6379

The credentials are the data nodes' (the primary and its replicas); sentinels that need
their own are given with `?sentinel_password=...` (and `sentinel_username`). A cluster's
nodes are where the client starts: it learns the rest, and the slots, from them. A cluster
has one database, 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

#: Sentinel URL schemes, and whether each speaks TLS to the data nodes.
SENTINEL_SCHEMES = {"redis+sentinel": False, "rediss+sentinel": True}
#: Redis Cluster URL schemes, and whether each speaks TLS.
CLUSTER_SCHEMES = {"redis+cluster": False, "rediss+cluster": True}
#: A sentinel's port when the URL gives none.
SENTINEL_PORT = 26379
#: A cluster node's port when the URL gives none.
CLUSTER_PORT = 6379


@dataclass(frozen=True)
class SentinelTarget:
    """What a Sentinel URL names: the sentinels, the service (the monitored primary's name),
    the database and the credentials."""

    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    ssl: bool = False
    sentinel_username: str | None = None
    sentinel_password: str | None = None

    def node_kwargs(self) -> dict[str, Any]:
        out: dict[str, Any] = {"db": self.db, "username": self.username, "password": self.password}
        if self.ssl:
            out["ssl"] = True
        return out

    def sentinel_kwargs(self, timeout_s: float) -> dict[str, Any]:
        return {
            "socket_connect_timeout": timeout_s,
            "socket_timeout": timeout_s,
            "username": self.sentinel_username,
            "password": self.sentinel_password,
        }


def sentinel_target(url: str) -> SentinelTarget | None:
    """The Sentinel URL's parts; None for a URL of one server.

    Raises:
        ValueError: If a Sentinel URL lacks its service or has a bad port or database.
    """
    parts = urlsplit(url)
    if parts.scheme not in SENTINEL_SCHEMES:
        return None
    userinfo, _, hosts = parts.netloc.rpartition("@")
    username, _, password = userinfo.partition(":")
    sentinels = _hosts(hosts, SENTINEL_PORT, "a Sentinel URL")
    path = [p for p in parts.path.split("/") if p]
    if not path or len(path) > 2:
        raise ValueError("a Sentinel URL names its service: redis+sentinel://host:26379,.../<service>[/<db>]")
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    return SentinelTarget(
        sentinels=sentinels,
        service=path[0],
        db=int(path[1]) if len(path) > 1 else 0,
        username=unquote(username) or None,
        password=unquote(password) or None,
        ssl=SENTINEL_SCHEMES[parts.scheme],
        sentinel_username=query.get("sentinel_username"),
        sentinel_password=query.get("sentinel_password"),
    )


@dataclass(frozen=True)
class ClusterTarget:
    """What a Redis Cluster URL names: the nodes to start from and the credentials."""

    nodes: tuple[tuple[str, int], ...]
    username: str | None = None
    password: str | None = None
    ssl: bool = False

    def node_kwargs(self) -> dict[str, Any]:
        out: dict[str, Any] = {"username": self.username, "password": self.password}
        if self.ssl:
            out["ssl"] = True
        return out


def cluster_target(url: str) -> ClusterTarget | None:
    """The Redis Cluster URL's parts; None for any other URL.

    Raises:
        ValueError: If it has a bad port, or names a database other than 0.
    """
    parts = urlsplit(url)
    if parts.scheme not in CLUSTER_SCHEMES:
        return None
    userinfo, _, hosts = parts.netloc.rpartition("@")
    username, _, password = userinfo.partition(":")
    path = [p for p in parts.path.split("/") if p]
    if path not in ([], ["0"]):
        raise ValueError("a Redis Cluster has one database, 0: redis+cluster://host:6379,host2:6379[/0]")
    return ClusterTarget(
        nodes=_hosts(hosts, CLUSTER_PORT, "a Redis Cluster URL"),
        username=unquote(username) or None,
        password=unquote(password) or None,
        ssl=CLUSTER_SCHEMES[parts.scheme],
    )


def _hosts(hosts: str, default_port: int, what: str) -> tuple[tuple[str, int], ...]:
    found = []
    for host in hosts.split(","):
        name, _, port = host.rpartition(":") if ":" in host else (host, "", "")
        if not name:
            raise ValueError(f"{what} lists host:port pairs, not {host!r}")
        try:
            number = int(port) if port else default_port
        except ValueError:
            raise ValueError(f"{what}: the port of {host!r} must be a number") from None
        if not 0 < number < 65536:
            raise ValueError(f"{what}: the port of {host!r} must be from 1 to 65535")
        found.append((name, number))
    return tuple(found)
