"""Per-tenant Redis credentials: an ACL user that can read one tenant's keys and nothing else.

The user `<prefix>.tenant.<tenant>` may run the read commands a results consumer needs
(`ResultsReader`: GET, XRANGE/XREVRANGE, XREAD, consumer groups with XREADGROUP and XACK,
and a few more), only on keys matching `<prefix>:{<tenant>}:*`. Every other command (KEYS,
SCAN, writes, admin, pub/sub) is refused, and so is any key outside the pattern (`NOPERM`).
Tenant names cannot hold glob or brace characters (`TenantName`), so the pattern matches
exactly one tenant's keys.

Each call issues a new password and revokes the earlier ones: handing out credentials again
rotates them. ACL users live in the server's memory; a managed Redis keeps them as its own
ACL configuration does (an ACL file, or `ACL SAVE`).
"""

from __future__ import annotations

import secrets
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import redis
from pydantic import TypeAdapter, ValidationError
from redis.cluster import RedisCluster

from agentpool.cluster.clients import is_cluster, sync_client
from agentpool.cluster.keys import Keys
from agentpool.errors import ConfigError, InvalidTask
from agentpool.models import TenantName

#: What a tenant's consumer may run: reads of its own keys, consumer-group bookkeeping on its
#: own streams, and connection housekeeping. Nothing that lists keys or reaches other keys.
TENANT_COMMANDS = (
    # strings, hashes, key metadata
    "get",
    "mget",
    "strlen",
    "exists",
    "type",
    "ttl",
    "pttl",
    "hget",
    "hmget",
    "hgetall",
    "hlen",
    "hkeys",
    "hexists",
    # streams, read side and consumer groups
    "xrange",
    "xrevrange",
    "xlen",
    "xread",
    "xreadgroup",
    "xack",
    "xpending",
    "xclaim",
    "xautoclaim",
    "xgroup|create",
    "xgroup|createconsumer",
    "xgroup|delconsumer",
    "xinfo|stream",
    "xinfo|groups",
    "xinfo|consumers",
    # connection
    "ping",
    "echo",
    "hello",
    "client|setname",
    "client|getname",
    "client|id",
)
#: What a Redis Cluster client runs besides: it learns the slots' nodes.
CLUSTER_COMMANDS = ("cluster|slots", "cluster|shards", "cluster|nodes", "cluster|info", "readonly", "command")

_TENANT = TypeAdapter(TenantName)


def tenant_user(keys: Keys, tenant: str) -> str:
    """The ACL user name of `tenant`'s credentials."""
    return f"{keys.prefix}.tenant.{tenant}"


def tenant_rules(keys: Keys, tenant: str, password: str, *, cluster: bool = False) -> list[str]:
    """The `ACL SETUSER` rules: everything reset, then one key pattern and the allowed
    commands (on a Redis Cluster, also those its client learns the slots with)."""
    return [
        "reset",
        "on",
        f">{password}",
        f"~{keys.prefix}:{{{tenant}}}:*",
        "resetchannels",
        "-@all",
        *(f"+{command}" for command in (*TENANT_COMMANDS, *(CLUSTER_COMMANDS if cluster else ()))),
    ]


def checked_tenant(tenant: str) -> str:
    try:
        return _TENANT.validate_python(tenant)
    except ValidationError:
        raise InvalidTask(
            f"tenant name {tenant!r} is not valid: letters, digits, '_', '.', '-' only (no globs, braces, colons)",
            reason="tenant_name",
        ) from None


def create_tenant_credentials(admin_url: str, tenant: str, *, keys: Keys | None = None) -> str:
    """Creates (or rotates) `tenant`'s ACL user on the Redis at `admin_url`; returns a URL
    that logs in as it (the admin URL's host, port and database, the tenant's user).

    Raises:
        InvalidTask: If the tenant name is not valid.
        ConfigError: If the server refuses (no ACL support, or the admin user may not set users).
    """
    tenant = checked_tenant(tenant)
    keys = keys or Keys()
    user, password = tenant_user(keys, tenant), secrets.token_urlsafe(32)
    client = sync_client(admin_url)
    cluster = is_cluster(client)
    # ACL users live per server: on a cluster, every node (primaries and replicas) gets it.
    where: dict[str, Any] = {"target_nodes": RedisCluster.ALL_NODES} if cluster else {}
    try:
        client.execute_command("ACL", "SETUSER", user, *tenant_rules(keys, tenant, password, cluster=cluster), **where)
    except redis.ResponseError as exc:
        raise ConfigError(f"Redis refused to create ACL user {user}: {exc}") from None
    finally:
        client.close()
    parts = urlsplit(admin_url)
    hosts = parts.netloc.rpartition("@")[2] or "127.0.0.1"  # host:port, or a Sentinel URL's list
    netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{hosts}"
    query = parts.query if parts.scheme.endswith("+sentinel") else ""  # the sentinels' own credentials
    return urlunsplit((parts.scheme, netloc, parts.path or "/0", query, ""))


def revoke_tenant_credentials(admin_url: str, tenant: str, *, keys: Keys | None = None) -> bool:
    """Deletes `tenant`'s ACL user (connections logged in as it are closed). Returns whether
    there was one."""
    tenant = checked_tenant(tenant)
    client = sync_client(admin_url)
    where: dict[str, Any] = {"target_nodes": RedisCluster.ALL_NODES} if is_cluster(client) else {}
    try:
        found = client.execute_command("ACL", "DELUSER", tenant_user(keys or Keys(), tenant), **where)
        return bool(max(found.values()) if isinstance(found, dict) else found)
    finally:
        client.close()


def display_url(url: str) -> str:
    """`url` with its passwords masked, for printing (a Sentinel URL's hosts kept as they are)."""
    parts = urlsplit(url)
    userinfo, at, hosts = parts.netloc.rpartition("@")
    user, colon, password = userinfo.partition(":")
    pairs = (p.partition("=") for p in parts.query.split("&") if p)
    query = "&".join(f"{k}=***" if k.endswith("password") else f"{k}={v}" for k, _, v in pairs)
    if not (at and colon and password) and query == parts.query:
        return url
    netloc = f"{user}:***@{hosts}" if at and colon and password else parts.netloc
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
