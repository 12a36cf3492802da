"""The pool handle's front-door side: the HTTP API's keys per tenant and the tenants'
webhook endpoints, deliveries and dead letters, kept in Redis (a mixin of `AgentPool`, kept
apart for size)."""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any, TypeVar

import redis.asyncio as aioredis

from agentpool.cluster.acl import create_tenant_credentials, revoke_tenant_credentials
from agentpool.cluster.api_keys import ApiKeys
from agentpool.cluster.clients import async_client
from agentpool.cluster.keys import Keys
from agentpool.cluster.webhook_store import WebhookStore
from agentpool.errors import InvalidWebhook
from agentpool.webhooks import check_endpoint, new_secret

if TYPE_CHECKING:
    from agentpool.config import PoolConfig

T = TypeVar("T")


def _blocking(redis_url: str, call: Callable[[aioredis.Redis], Awaitable[T]]) -> T:
    """Runs one call of an async store to completion from synchronous code, with a client of
    its own (on a thread of its own when this thread already runs an event loop, as in a
    notebook)."""

    async def once() -> T:
        client = async_client(redis_url, decode_responses=True, socket_connect_timeout=5)
        try:
            return await call(client)
        finally:
            await client.aclose()

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(once())
    with concurrent.futures.ThreadPoolExecutor(1) as thread:
        return thread.submit(asyncio.run, once()).result()


class PoolFrontDoor:
    """API keys and webhooks of the tenants, from the pool's handle."""

    config: PoolConfig
    _redis_url: str

    if TYPE_CHECKING:  # AgentPool's; declared here for the type checker only

        def _check_running(self) -> None: ...

    def create_api_key(self, tenant: str, *, name: str = "") -> str:
        """A new key of the HTTP API for `tenant` (`Authorization: Bearer <key>`), returned
        once: Redis keeps only its salted hash. A tenant may hold several (rotation).

        Raises:
            InvalidTask: If the tenant name is not valid.
        """
        self._check_running()
        created, _ = _blocking(self._redis_url, lambda r: self._api_keys(r).create(tenant, name=name))
        return created

    def api_keys(self, tenant: str) -> list[dict[str, Any]]:
        """The tenant's HTTP API keys: id, name, when made (never the key or its hash)."""
        self._check_running()
        found = _blocking(self._redis_url, lambda r: self._api_keys(r).list(tenant))
        return [dict(k.__dict__) for k in found]

    def revoke_api_key(self, key_id: str) -> bool:
        """Revokes an HTTP API key by its id (requests with it get 401 from now on); whether
        it existed."""
        self._check_running()
        return _blocking(self._redis_url, lambda r: self._api_keys(r).revoke(key_id))

    def _api_keys(self, client: aioredis.Redis) -> ApiKeys:
        return ApiKeys(client, Keys(self.config.key_prefix))

    def _webhook_store(self, client: aioredis.Redis) -> WebhookStore:
        return WebhookStore(client, Keys(self.config.key_prefix), self.config.name)

    def add_webhook(
        self, tenant: str, url: str, *, events: Iterable[str] = ("run.completed",), description: str = ""
    ) -> dict[str, Any]:
        """Registers a webhook endpoint for `tenant`: each of its runs that ends from now on
        is POSTed there as signed JSON (Standard Webhooks), at least once. Returns the
        endpoint with its `secret` (`whsec_...`), which receivers verify with
        (`agentpool.webhooks.verify`); `webhooks()` never shows it again.

        Raises:
            InvalidWebhook: If the URL is not http(s), its host is not on the tenant's
                `webhook_hosts`, it names an address webhooks may not go to, an event is
                unknown, or the tenant has `WebhookConfig.max_endpoints` already.
        """
        self._check_running()
        checked = check_endpoint(self.config, tenant, url, events)
        existing = _blocking(self._redis_url, lambda r: self._webhook_store(r).endpoints(tenant))
        if len(existing) >= self.config.webhooks.max_endpoints:
            raise InvalidWebhook(
                f"tenant {tenant!r} has {len(existing)} webhook endpoints; at most {self.config.webhooks.max_endpoints}"
            )
        secret = new_secret()
        return _blocking(
            self._redis_url, lambda r: self._webhook_store(r).add(tenant, url, checked, description[:200], secret)
        )

    def webhooks(self, tenant: str) -> list[dict[str, Any]]:
        """The tenant's webhook endpoints (without their secrets)."""
        self._check_running()
        found = _blocking(self._redis_url, lambda r: self._webhook_store(r).endpoints(tenant))
        return [{k: v for k, v in e.items() if k != "secret"} for e in found]

    def remove_webhook(self, tenant: str, endpoint_id: str) -> bool:
        """Removes an endpoint (deliveries still due to it are dropped); whether it existed."""
        self._check_running()
        return _blocking(self._redis_url, lambda r: self._webhook_store(r).remove(tenant, endpoint_id))

    def webhook_deliveries(self, tenant: str, task_id: str) -> list[dict[str, Any]]:
        """Every delivery attempt of the run's webhooks, oldest first: endpoint, attempt,
        status code, error, when."""
        self._check_running()
        return _blocking(self._redis_url, lambda r: self._webhook_store(r).log(tenant, task_id))

    def dead_webhooks(self, tenant: str, count: int = 100) -> list[dict[str, Any]]:
        """The tenant's deliveries given up on (newest first), with their last error."""
        self._check_running()
        return _blocking(self._redis_url, lambda r: self._webhook_store(r).dead_letters(tenant, count))

    def tenant_credentials(self, tenant: str) -> str:
        """A Redis URL for `tenant`'s consumers: an ACL user that can read only the tenant's
        keys (`<prefix>:{tenant}:*`) with the commands `ResultsReader` uses, and gets `NOPERM`
        on any other key. Calling it again rotates the password (earlier URLs stop working).

        Raises:
            InvalidTask: If the tenant name is not valid.
            ConfigError: If the Redis server refuses to create ACL users.
        """
        return create_tenant_credentials(self._redis_url, tenant, keys=Keys(self.config.key_prefix))

    def revoke_tenant_credentials(self, tenant: str) -> bool:
        """Deletes `tenant`'s ACL user; returns whether it existed."""
        return revoke_tenant_credentials(self._redis_url, tenant, keys=Keys(self.config.key_prefix))
