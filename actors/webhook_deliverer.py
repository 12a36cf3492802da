"""The webhook deliverer: a pool actor that turns final records into signed webhook
deliveries and sends them, at least once, apart from the workers (a slow or dead receiver
holds no worker and no task).

Two loops: intake reads the results streams of the tenants that have endpoints (a consumer
group, so an entry it read and did not schedule is read again after a restart) and records
one delivery per endpoint; dispatch claims due deliveries (a lease: a deliverer that dies
loses none), sends them with bounded concurrency, and logs each attempt: delivered,
due again after an exponential backoff with jitter, or a dead letter once
`WebhookConfig.give_up_after_s` has passed. Outbound addresses are checked at every attempt,
after resolution (no SSRF through a name that resolves to an internal address).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress
import json
import logging
import os
import socket
import time
from collections import Counter
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import ray
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from redis.exceptions import RedisError

from agentpool import heap
from agentpool.background import Background
from agentpool.cluster.clients import async_client
from agentpool.cluster.keys import Keys
from agentpool.cluster.live_config import LiveConfig
from agentpool.cluster.webhook_store import WebhookStore
from agentpool.config import PoolConfig
from agentpool.webhooks import EVENT_SOURCES, WebhookEvent, address_allowed, host_allowed, retry_delay_s, sign

log = logging.getLogger("agentpool.webhooks")
#: A claimed delivery is due again after this long if its deliverer has not settled it.
_LEASE_S = 120.0
#: How often dispatch looks for due deliveries when nothing woke it.
_POLL_S = 0.25


class AddressRefused(OSError):
    """The webhook's host resolves only to addresses the pool may not send to."""


class _CheckedResolver(AbstractResolver):
    """Resolves as usual, keeping only the addresses webhooks may go to."""

    def __init__(self, allow_private: bool) -> None:
        self._inner = DefaultResolver()
        self._allow_private = allow_private

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        found = await self._inner.resolve(host, port, family)
        kept = [r for r in found if address_allowed(r["host"], allow_private=self._allow_private)]
        if not kept:
            raise AddressRefused(f"{host} resolves only to addresses webhooks may not be sent to")
        return kept

    async def close(self) -> None:
        await self._inner.close()


def _literal_refused(url: str, allow_private: bool) -> bool:
    """A URL whose host is an IP address the pool may not send to (aiohttp resolves no literal)."""
    host = urlsplit(url).hostname or ""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return not address_allowed(host, allow_private=allow_private)


@ray.remote
class WebhookDeliverer:
    """Async actor `<pool>-webhooks`."""

    def __init__(self, config: PoolConfig, redis_url: str, index: int = 0) -> None:
        self._config = config
        self._hooks = config.webhooks
        self._redis = async_client(redis_url, decode_responses=True, socket_connect_timeout=5)
        self._store = WebhookStore(self._redis, Keys(config.key_prefix), config.name)
        self._live = LiveConfig(lambda: self._redis, Keys(config.key_prefix), config.name)
        #: The live configuration's version applied (`pool.update_config`), and when read.
        self._config_version, self._config_read = 0, 0.0
        self._consumer = f"deliverer-{index}"
        self._background = Background()
        self._slots = asyncio.Semaphore(self._hooks.concurrency)
        self._wake = asyncio.Event()
        self._session: aiohttp.ClientSession | None = None
        self._counts: Counter[str] = Counter()
        self._endpoints: dict[str, tuple[float, dict[str, dict[str, Any]]]] = {}
        self._loops: list[asyncio.Task[None]] = []
        # Starts its loops in a call to itself, which runs once this constructor returns.
        self._boot = ray.get_runtime_context().current_actor.start.remote()
        heap.settle()

    async def start(self) -> None:
        if not self._loops:
            self._loops = [asyncio.ensure_future(self._intake()), asyncio.ensure_future(self._dispatch())]

    def pid(self) -> int:
        """This actor's process id (an upgrade checks its restart by it)."""
        return os.getpid()

    def stats(self) -> dict[str, Any]:
        """Deliveries made, attempts that failed, dead letters, and deliveries in flight."""
        return {**self._counts, "in_flight": self._hooks.concurrency - self._slots._value}

    # --- intake ------------------------------------------------------------------------

    async def _intake(self) -> None:
        pending = True  # first this consumer's own unacknowledged entries (after a restart)
        while True:
            try:
                sources = await self._sources()
                if not sources:
                    await asyncio.sleep(0.5)
                    continue
                rows = await self._store.read_sources(
                    list(sources), self._consumer, pending=pending, block_ms=None if pending else 1000
                )
                if pending and not rows:
                    pending = False
                    continue
                now = time.time()
                for stream, entry_id, fields in rows:
                    tenant, completed = sources[stream]
                    kind = WebhookEvent.RUN_COMPLETED if completed else _event_kind(fields)
                    endpoints = await self._endpoints_of(tenant, fresh=True)
                    jobs = [
                        self._job(endpoint, kind, fields, entry_id, now)
                        for endpoint in endpoints.values()
                        if kind is not None and kind in endpoint["events"]
                    ]
                    await self._store.schedule(tenant, stream, entry_id, jobs, now)
                if rows:
                    self._wake.set()
            except (RedisError, OSError) as exc:
                log.warning("webhook intake: Redis unavailable (%s); retrying", type(exc).__name__)
                await asyncio.sleep(1.0)

    async def _sources(self) -> dict[str, tuple[str, bool]]:
        """The streams messages come from now: stream -> (tenant, whether it is the results
        stream), for the events the tenants' endpoints subscribe to."""
        sources: dict[str, tuple[str, bool]] = {}
        for tenant in await self._store.tenants():
            endpoints = await self._endpoints_of(tenant)
            events = sorted({e for endpoint in endpoints.values() for e in endpoint["events"]})
            for stream in self._store.streams_of(tenant, events):
                sources[stream] = (tenant, stream == self._store.keys.results(tenant))
        return sources

    @staticmethod
    def _job(
        endpoint: dict[str, Any], kind: WebhookEvent, fields: dict[str, str], entry_id: str, now: float
    ) -> dict[str, Any]:
        """One message to one endpoint. `webhook-id` is the same on every attempt: the task's
        for its completion, the task's and its event's entry for the others."""
        task_id = fields["task_id"]
        stamp = _iso(now)
        if kind is WebhookEvent.RUN_COMPLETED:
            key, body = task_id, f'{{"type":"{kind}","timestamp":"{stamp}","data":{fields["result"]}}}'
        else:
            key = f"{task_id}_{entry_id}"
            data = {"task_id": task_id, "trace_id": fields.get("trace_id", ""), "event": json.loads(fields["data"])}
            body = json.dumps({"type": kind.value, "timestamp": stamp, "data": data}, separators=(",", ":"))
        return {
            "id": f"{endpoint['id']}:{key}",
            "msg_id": f"msg_{key}",
            "endpoint": endpoint["id"],
            "task_id": task_id,
            "event": kind.value,
            "body": body,
            "attempts": 0,
            "first_unix": now,
        }

    async def _endpoints_of(self, tenant: str, *, fresh: bool = False) -> dict[str, dict[str, Any]]:
        """The tenant's endpoints by id, read again at most every 2 s."""
        cached = self._endpoints.get(tenant)
        if fresh or cached is None or time.monotonic() - cached[0] > 2.0:
            found = {e["id"]: e for e in await self._store.endpoints(tenant)}
            self._endpoints[tenant] = (time.monotonic(), found)
            return found
        return cached[1]

    async def _read_config(self) -> None:
        """The tenants' policies as `pool.update_config` last set them, read at most every 2 s."""
        if time.monotonic() - self._config_read < 2.0:
            return
        self._config_read = time.monotonic()
        if await self._live.version() > self._config_version:
            version, live = await self._live.load()
            self._config, self._config_version = self._config.with_live(live), version

    # --- dispatch ----------------------------------------------------------------------

    async def _dispatch(self) -> None:
        while True:
            try:
                free = self._slots._value
                if free:
                    now = time.time()
                    for tenant in await self._store.tenants():
                        for job in await self._store.claim(tenant, now, _LEASE_S, free):
                            await self._slots.acquire()
                            self._background.spawn(self._deliver(tenant, job))
            except (RedisError, OSError) as exc:
                log.warning("webhook dispatch: Redis unavailable (%s); retrying", type(exc).__name__)
                await asyncio.sleep(1.0)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), _POLL_S)

    async def _deliver(self, tenant: str, job: dict[str, Any]) -> None:
        try:
            await self._attempt(tenant, job)
        except (RedisError, OSError) as exc:  # the lease ends and the delivery is claimed again
            log.warning("webhook %s: could not record its attempt (%s)", job["id"], type(exc).__name__)
        finally:
            self._slots.release()

    async def _attempt(self, tenant: str, job: dict[str, Any]) -> None:
        endpoint = (await self._endpoints_of(tenant)).get(job["endpoint"])
        job["attempts"] += 1
        started = time.time()
        attempt: dict[str, Any] = {
            "attempt": job["attempts"],
            "webhook_id": job["msg_id"],
            "endpoint": job["endpoint"],
            "event": job["event"],
            "ts": round(started, 3),
            "status_code": None,
            "ok": False,
            "error": None,
        }
        if endpoint is None:
            attempt["error"] = "the endpoint was removed"
            await self._settle(tenant, job, attempt, retry_at=None, dead=False)
            return
        attempt["url"] = _shown(endpoint["url"])
        await self._read_config()
        policy = self._config.policy_for(tenant) or self._config.default_tenant_policy
        if not host_allowed(endpoint["url"], policy.webhook_hosts):
            attempt["error"] = "the host is not on the tenant's webhook allowlist"
            await self._settle(tenant, job, attempt, retry_at=None, dead=True)
            return
        try:
            status = await self._post(endpoint, job)
            attempt["status_code"] = status
            attempt["ok"] = 200 <= status < 300
            if not attempt["ok"]:
                attempt["error"] = f"HTTP {status}"
        except AddressRefused as exc:
            attempt["error"] = str(exc)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            attempt["error"] = f"{type(exc).__name__}: {exc}"[:300]
        attempt["duration_ms"] = round((time.time() - started) * 1000, 1)
        if attempt["ok"]:
            self._counts["delivered"] += 1
            await self._settle(tenant, job, attempt, retry_at=None, dead=False)
            return
        self._counts["failed_attempts"] += 1
        delay = retry_delay_s(job["attempts"], first_s=self._hooks.first_retry_s, max_s=self._hooks.max_retry_s)
        if started + delay - job["first_unix"] > self._hooks.give_up_after_s:
            self._counts["dead"] += 1
            log.warning("webhook %s to %s given up after %d attempts", job["id"], attempt["url"], job["attempts"])
            await self._settle(tenant, job, attempt, retry_at=None, dead=True)
        else:
            await self._settle(tenant, job, attempt, retry_at=started + delay, dead=False)

    async def _settle(
        self, tenant: str, job: dict[str, Any], attempt: dict[str, Any], *, retry_at: float | None, dead: bool
    ) -> None:
        await self._store.settle(tenant, job, attempt, retry_at=retry_at, dead=dead, ttl_s=self._hooks.log_ttl_s)

    async def _post(self, endpoint: dict[str, Any], job: dict[str, Any]) -> int:
        allow_private = self._hooks.allow_private_addresses
        if _literal_refused(endpoint["url"], allow_private):
            raise AddressRefused(f"{urlsplit(endpoint['url']).hostname} is an address webhooks may not be sent to")
        if self._session is None:
            connector = aiohttp.TCPConnector(resolver=_CheckedResolver(allow_private), limit=self._hooks.concurrency)
            self._session = aiohttp.ClientSession(connector=connector)
        headers = {
            **sign(endpoint["secret"], job["msg_id"], dt.datetime.now(dt.UTC), job["body"]),
            "content-type": "application/json",
            "user-agent": "agentpool-webhooks",
        }
        timeout = aiohttp.ClientTimeout(total=self._hooks.timeout_s)
        async with self._session.post(
            endpoint["url"], data=job["body"].encode(), headers=headers, timeout=timeout, allow_redirects=False
        ) as response:
            await response.read()
            return response.status


def _event_kind(fields: dict[str, str]) -> WebhookEvent | None:
    """The webhook an events-stream entry makes, if any (a task taken up again after a
    restart is not queued anew)."""
    kind = EVENT_SOURCES.get(fields.get("event", ""))
    if kind is WebhookEvent.RUN_QUEUED and json.loads(fields.get("data") or "{}").get("adopted"):
        return None
    return kind


def _shown(url: str) -> str:
    """A URL as logs and delivery logs show it: without its query or fragment (receivers
    put tokens there)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"


def _iso(unix: float) -> str:
    return dt.datetime.fromtimestamp(unix, dt.UTC).isoformat().replace("+00:00", "Z")
