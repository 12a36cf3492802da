"""Webhooks: what the pool sends, how a receiver checks it, and the pure rules of delivery.

A delivery is an HTTP POST of JSON signed per the Standard Webhooks spec (headers
`webhook-id`, `webhook-timestamp`, `webhook-signature`: `v1,` and the base64 HMAC-SHA256 of
`{id}.{timestamp}.{body}` under the endpoint's secret). Delivery is at least once: a
receiver drops repeats by `webhook-id`, which is the same on every attempt of one message.

A receiver checks a delivery with `verify(body, headers, secret)`.
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import ipaddress
import random
import secrets
from collections.abc import Iterable, Mapping
from enum import StrEnum
from typing import Any
from urllib.parse import urlsplit

from standardwebhooks import Webhook, WebhookVerificationError

from agentpool.config import PoolConfig
from agentpool.errors import InvalidWebhook

__all__ = [
    "EVENT_SOURCES",
    "WebhookEvent",
    "WebhookVerificationError",
    "address_allowed",
    "check_endpoint",
    "host_allowed",
    "new_secret",
    "retry_delay_s",
    "sign",
    "verify",
]


class WebhookEvent(StrEnum):
    """What an endpoint may subscribe to."""

    #: A run ended (any final status); the body's `data` is its final record.
    RUN_COMPLETED = "run.completed"
    #: A run was accepted and queued; `data` is `{"task_id", "event"}` with the event's fields.
    RUN_QUEUED = "run.queued"
    #: A run paused for a human's approval (the tools and the deadline in `data.event`).
    RUN_APPROVAL_REQUESTED = "run.approval_requested"

    @property
    def from_events(self) -> bool:
        """Made from the tenant's events stream (every kind but `run.completed`)."""
        return self is not WebhookEvent.RUN_COMPLETED


#: The events-stream entry each event-made webhook comes from.
EVENT_SOURCES: dict[str, WebhookEvent] = {
    "task_admitted": WebhookEvent.RUN_QUEUED,
    "approval_requested": WebhookEvent.RUN_APPROVAL_REQUESTED,
}


def new_secret() -> str:
    """A fresh endpoint secret in the spec's form: `whsec_` and 32 random bytes, base64."""
    import base64

    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def sign(secret: str, msg_id: str, timestamp: dt.datetime, body: str) -> dict[str, str]:
    """The three headers of a delivery of `body`."""
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(timestamp.timestamp())),
        "webhook-signature": Webhook(secret).sign(msg_id, timestamp, body),
    }


def verify(body: str | bytes, headers: Mapping[str, str], secret: str) -> Any:
    """Checks a delivery as a receiver must: the signature under `secret`, and a timestamp
    within five minutes of now (a replay of an old delivery fails). Returns the parsed body.

    Raises:
        WebhookVerificationError: If the signature or the timestamp does not check out.
    """
    lowered = {k.lower(): v for k, v in headers.items()}
    return Webhook(secret).verify(body, lowered)


def retry_delay_s(attempt: int, *, first_s: float, max_s: float, rng: random.Random | None = None) -> float:
    """How long to wait after failed attempt number `attempt` (1 for the first): doubling
    from `first_s`, at most `max_s`, with "full jitter" (uniform between half and all of
    it), so that deliveries failing together do not retry together."""
    ceiling = min(max_s, first_s * 2 ** min(max(attempt - 1, 0), 60))
    return (rng or random).uniform(ceiling / 2, ceiling)


def host_allowed(url: str, allowlist: Iterable[str] | None) -> bool:
    """Whether the URL's host is on the tenant's allowlist (exact names or `*.` patterns);
    every host is, with no allowlist."""
    host = (urlsplit(url).hostname or "").lower()
    if not host:
        return False
    if allowlist is None:
        return True
    return any(fnmatch.fnmatchcase(host, pattern.lower()) for pattern in allowlist)


def address_allowed(address: str, *, allow_private: bool) -> bool:
    """Whether a webhook may be sent to this IP address: never to an unspecified, multicast
    or reserved one; to a loopback, link-local or private one only if `allow_private`."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_unspecified or ip.is_multicast:
        return False
    if ip.is_loopback or ip.is_link_local or ip.is_private:
        return allow_private
    if ip.is_reserved:
        return False
    return ip.is_global or allow_private  # shared (carrier-grade NAT) space is internal too


def check_endpoint(config: PoolConfig, tenant: str, url: str, events: Iterable[str]) -> list[str]:
    """Checks an endpoint before it is registered; returns its events, checked.

    Raises:
        InvalidWebhook: If the URL is not http(s) with a host, is longer than 2,048
            characters, has credentials, its host is off the tenant's `webhook_hosts` or is
            an address (or `localhost`) webhooks may not go to, or an event is unknown.
    """
    if len(url) > 2048:
        raise InvalidWebhook("the webhook URL is longer than 2048 characters")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidWebhook("a webhook URL is http:// or https:// with a host")
    if parts.username or parts.password:
        raise InvalidWebhook("a webhook URL carries no credentials (receivers verify the signature)")
    policy = config.policy_for(tenant) or config.default_tenant_policy
    if not host_allowed(url, policy.webhook_hosts):
        raise InvalidWebhook(f"{parts.hostname} is not on tenant {tenant!r}'s webhook allowlist")
    private = config.webhooks.allow_private_addresses
    host = parts.hostname.lower()
    literal = True
    try:
        ipaddress.ip_address(host)
    except ValueError:
        literal = False
    internal_name = host == "localhost" or host.endswith((".localhost", ".local", ".internal"))
    if (literal and not address_allowed(host, allow_private=private)) or (internal_name and not private):
        raise InvalidWebhook(f"{host} is an internal address; webhooks go to public hosts only")
    checked = []
    for event in events:
        try:
            checked.append(WebhookEvent(event).value)
        except ValueError:
            raise InvalidWebhook(f"unknown webhook event {event!r}; known: {[e.value for e in WebhookEvent]}") from None
    if not checked:
        raise InvalidWebhook("a webhook subscribes to at least one event")
    return sorted(set(checked))
