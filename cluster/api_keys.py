"""The HTTP API's keys in Redis: made per tenant, shown once, kept only as a salted hash,
revocable one by one (several per tenant, for rotation); and the count of failed
authentications per source address that rate-limits guessing.

A key reads `ap_<key id>_<secret>`: the id finds its record, the secret (32 random bytes)
is checked against the record's salted SHA-256 in constant time. A fast hash is right for a
random 256-bit secret (nothing to brute-force, unlike a password); the salt keeps equal
secrets from sharing a hash.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from agentpool.cluster.acl import checked_tenant
from agentpool.cluster.clients import is_cluster
from agentpool.cluster.keys import Keys

_KEY = re.compile(r"^ap_([0-9a-f]{16})_([A-Za-z0-9_-]{43})$")


@dataclass(frozen=True)
class ApiKey:
    key_id: str
    tenant: str
    name: str
    created_unix: float


def _digest(salt: str, secret: str) -> str:
    return hashlib.sha256(f"{salt}:{secret}".encode()).hexdigest()


class ApiKeys:
    """Makes, checks, lists and revokes API keys (async; one client per process)."""

    def __init__(self, redis: aioredis.Redis, keys: Keys) -> None:
        self._redis = redis
        self._keys = keys

    async def create(self, tenant: str, *, name: str = "") -> tuple[str, ApiKey]:
        """A new key for `tenant`: (the key itself, to show once; its record).

        Raises:
            InvalidTask: If the tenant name is not valid.
        """
        tenant = checked_tenant(tenant)
        key_id, secret, salt = secrets.token_hex(8), secrets.token_urlsafe(32), secrets.token_hex(16)
        record = ApiKey(key_id=key_id, tenant=tenant, name=name[:100], created_unix=round(time.time(), 3))
        stored = {**record.__dict__, "salt": salt, "hash": _digest(salt, secret)}
        # The tenant's list first: on a Redis Cluster the two keys are in different slots and
        # cannot share a transaction, and an id listed without its record is skipped.
        pipe = self._redis.pipeline(transaction=not is_cluster(self._redis))
        pipe.sadd(self._keys.tenant_api_keys(tenant), key_id)
        pipe.hset(self._keys.api_keys(), key_id, json.dumps(stored))
        await pipe.execute()
        return f"ap_{key_id}_{secret}", record

    async def check(self, presented: str, source: str) -> tuple[ApiKey | None, int]:
        """The key's record if `presented` is a live key (else None), and the failed
        authentications from `source` in the current window: one round trip."""
        match = _KEY.match(presented)
        key_id, secret = match.groups() if match is not None else ("", "")
        pipe = self._redis.pipeline(transaction=False)
        pipe.get(self._keys.auth_failures(source))
        pipe.hget(self._keys.api_keys(), key_id or "-")
        failures, raw = await pipe.execute()
        return (self._verified(raw, secret) if match is not None else None), int(failures or 0)

    @staticmethod
    def _verified(raw: str | None, secret: str) -> ApiKey | None:
        if raw is None:
            return None
        stored: dict[str, Any] = json.loads(raw)
        if not hmac.compare_digest(stored["hash"], _digest(stored["salt"], secret)):
            return None
        return ApiKey(stored["key_id"], stored["tenant"], stored["name"], stored["created_unix"])

    async def list(self, tenant: str) -> list[ApiKey]:
        ids = sorted(await self._redis.smembers(self._keys.tenant_api_keys(tenant)))
        if not ids:
            return []
        found = await self._redis.hmget(self._keys.api_keys(), ids)
        records = [json.loads(raw) for raw in found if raw is not None]
        return [ApiKey(r["key_id"], r["tenant"], r["name"], r["created_unix"]) for r in records]

    async def revoke(self, key_id: str) -> bool:
        """Deletes the key (requests with it fail from now on); whether it existed."""
        raw = await self._redis.hget(self._keys.api_keys(), key_id)
        if raw is None:
            return False
        # The record first (the key stops working), then the listing (see `create`).
        pipe = self._redis.pipeline(transaction=not is_cluster(self._redis))
        pipe.hdel(self._keys.api_keys(), key_id)
        pipe.srem(self._keys.tenant_api_keys(json.loads(raw)["tenant"]), key_id)
        await pipe.execute()
        return True

    async def failed(self, source: str, window_s: int) -> int:
        """Counts one failed authentication from `source`; the window starts at its first."""
        key = self._keys.auth_failures(source)
        count = int(await self._redis.incr(key))
        if count == 1:  # (EXPIRE ... NX would need Redis 7)
            await self._redis.expire(key, window_s)
        return count
