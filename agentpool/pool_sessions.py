"""`pool.sessions`: a pool's conversations (`AgentTask(session_id=...)`), read, exported and
deleted from the pool's handle."""

from __future__ import annotations

import builtins
from collections.abc import Callable
from typing import Any

import ray

from agentpool.cluster.keys import Keys
from agentpool.cluster.sessions import SessionStore
from agentpool.config import PoolConfig
from agentpool.pool_front import _blocking


class Sessions:
    """The sessions of a pool's tenants. A session exists from its first task's record on,
    and lives the tenant's `SessionPolicy.ttl_s` after its last turn."""

    def __init__(self, config: PoolConfig, redis_url: str, scheduler: Any, check_running: Callable[[], None]) -> None:
        self._config = config
        self._redis_url = redis_url
        self._scheduler = scheduler
        self._check_running = check_running

    def _store(self, client: Any) -> SessionStore:
        return SessionStore(lambda: client, Keys(self._config.key_prefix), pool=self._config.name)

    def export(self, tenant: str, session_id: str) -> dict[str, Any] | None:
        """The session as JSON-ready data: its history (`messages`, as the Messages API
        takes them), `version`, `turns`, `compactions`, last update, and its tasks' ids
        (oldest first). None if the tenant has no such session.

        Raises:
            redis.RedisError: If Redis cannot be reached.
        """
        self._check_running()
        record = _blocking(self._redis_url, lambda c: self._store(c).export(tenant, session_id))
        return None if record is None else record.model_dump(mode="json")

    def list(self, tenant: str, *, limit: int = 100) -> builtins.list[dict[str, Any]]:
        """The tenant's sessions, the most recently used first (`session_id`, `updated_unix`)."""
        self._check_running()
        return _blocking(self._redis_url, lambda c: self._store(c).recent(tenant, limit))

    def delete(self, tenant: str, session_id: str) -> dict[str, Any]:
        """Deletes the session and everything of it: its history, and its tasks' records,
        checkpoints, events (their entries in the tenant's streams too), tool-call records,
        webhook deliveries and stored HTTP responses. Its tasks still in the pool are
        cancelled first. Returns what went: `tasks`, `cancelled`, `keys_deleted`,
        `stream_entries_deleted`, `messages_deleted`."""
        self._check_running()
        return dict(ray.get(self._scheduler.delete_session.remote(tenant, session_id)))

    def delete_all(self, tenant: str) -> dict[str, Any]:
        """Deletes every session of the tenant (as `delete`); returns the totals."""
        self._check_running()
        return dict(ray.get(self._scheduler.delete_sessions.remote(tenant)))
