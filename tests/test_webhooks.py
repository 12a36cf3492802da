"""Webhooks: the pure rules (backoff, allowlists, addresses, signatures), then delivery over
real HTTP to a real receiver that goes down for 20 s, and dead letters."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import random
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import ray
from hypothesis import given
from hypothesis import strategies as st

from agentpool import AgentPool, AgentTask, PoolConfig, SimulatorConfig, TenantPolicy
from agentpool.actors.webhook_deliverer import AddressRefused, _CheckedResolver, _shown
from agentpool.config import WebhookConfig
from agentpool.errors import InvalidWebhook
from agentpool.webhooks import (
    WebhookVerificationError,
    address_allowed,
    check_endpoint,
    host_allowed,
    new_secret,
    retry_delay_s,
    sign,
    verify,
)

# --- the pure rules -------------------------------------------------------------------------


class _Backlogged(ThreadingHTTPServer):
    """A receiver whose listen backlog holds a burst (the standard library's is 5: the
    connections past it wait a second for TCP to try again)."""

    request_queue_size = 1024


@given(attempt=st.integers(1, 200), first=st.floats(0.01, 60), cap=st.floats(0.01, 7200), seed=st.integers())
def test_retry_delays_double_from_the_first_within_the_cap_with_jitter(
    attempt: int, first: float, cap: float, seed: int
) -> None:
    delay = retry_delay_s(attempt, first_s=first, max_s=cap, rng=random.Random(seed))
    ceiling = min(cap, first * 2 ** (attempt - 1))
    assert ceiling / 2 <= delay <= ceiling


@pytest.mark.parametrize(
    ("address", "private_ok", "public_only"),
    [
        ("8.8.8.8", True, True),
        ("2606:4700:4700::1111", True, True),
        ("127.0.0.1", True, False),
        ("::1", True, False),
        ("10.1.2.3", True, False),
        ("172.16.0.1", True, False),
        ("192.168.1.1", True, False),
        ("169.254.169.254", True, False),  # the cloud metadata service
        ("fe80::1", True, False),
        ("::ffff:127.0.0.1", True, False),  # IPv4-mapped loopback
        ("100.64.0.1", True, False),  # carrier-grade NAT
        ("0.0.0.0", False, False),
        ("224.0.0.1", False, False),
        ("not an address", False, False),
    ],
)
def test_which_addresses_webhooks_may_reach(address: str, private_ok: bool, public_only: bool) -> None:
    assert address_allowed(address, allow_private=True) is private_ok
    assert address_allowed(address, allow_private=False) is public_only


def test_host_allowlists_match_names_and_patterns() -> None:
    assert host_allowed("https://hooks.example.com/x", None)
    assert host_allowed("https://hooks.example.com/x", ["*.example.com"])
    assert host_allowed("https://HOOKS.example.com/x", ["hooks.example.com"])
    assert not host_allowed("https://example.com.evil.io/x", ["*.example.com", "example.com"])
    assert not host_allowed("https:///nohost", None)


def test_registration_refuses_internal_and_unlisted_hosts_and_unknown_events() -> None:
    default = PoolConfig()
    for url in (
        "http://127.0.0.1:9000/h",
        "http://localhost/h",
        "http://[::1]/h",
        "http://169.254.169.254/",
        "ftp://x",
    ):
        with pytest.raises(InvalidWebhook):
            check_endpoint(default, "acme", url, ["run.completed"])
    with pytest.raises(InvalidWebhook, match="credentials"):
        check_endpoint(default, "acme", "https://user:pw@hooks.example.com/", ["run.completed"])
    with pytest.raises(InvalidWebhook, match="unknown webhook event"):
        check_endpoint(default, "acme", "https://hooks.example.com/", ["run.exploded"])
    listed = PoolConfig(tenants={"acme": TenantPolicy(webhook_hosts=["*.acme.com"])})
    assert check_endpoint(listed, "acme", "https://hooks.acme.com/", ["run.completed"]) == ["run.completed"]
    with pytest.raises(InvalidWebhook, match="allowlist"):
        check_endpoint(listed, "acme", "https://hooks.example.com/", ["run.completed"])
    inside = PoolConfig(webhooks=WebhookConfig(allow_private_addresses=True))
    assert check_endpoint(inside, "acme", "http://127.0.0.1:9000/h", ["run.completed"]) == ["run.completed"]


def test_a_signature_verifies_with_its_secret_only_and_not_when_stale() -> None:
    secret, body = new_secret(), json.dumps({"type": "run.completed", "data": {"task_id": "t1"}})
    headers = sign(secret, "msg_t1", dt.datetime.now(dt.UTC), body)
    assert verify(body, headers, secret)["data"]["task_id"] == "t1"
    with pytest.raises(WebhookVerificationError):
        verify(body, headers, new_secret())
    with pytest.raises(WebhookVerificationError):
        verify(body.replace("t1", "t2"), headers, secret)
    stale = sign(secret, "msg_t1", dt.datetime.now(dt.UTC) - dt.timedelta(minutes=10), body)
    with pytest.raises(WebhookVerificationError):
        verify(body, stale, secret)


def test_logs_show_a_webhook_url_without_its_query() -> None:
    assert _shown("https://hooks.example.com/in?token=s3cret#frag") == "https://hooks.example.com/in"


def test_the_resolver_drops_internal_addresses_of_a_name() -> None:
    async def resolve() -> None:
        resolver = _CheckedResolver(allow_private=False)
        try:
            with pytest.raises(AddressRefused):
                await resolver.resolve("localhost", 80)
        finally:
            await resolver.close()
        allowed = _CheckedResolver(allow_private=True)
        try:
            assert await allowed.resolve("localhost", 80)
        finally:
            await allowed.close()

    asyncio.run(resolve())


# --- delivery over real HTTP ------------------------------------------------------------------


class Receiver:
    """A real HTTP receiver on a fixed port that can go down (its socket closed) and come
    back; answers `status` to every delivery and keeps each (headers, body)."""

    def __init__(self, status: int = 204) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = int(probe.getsockname()[1])
        self.status = status
        self.got: list[tuple[dict[str, str], str]] = []
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks"

    def up(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"])).decode()
                receiver.got.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(receiver.status)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self._server = _Backlogged(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def down(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def wait_for(predicate: Any, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.1)


def hooked_pool(redis_url: str, **webhooks: Any) -> AgentPool:
    return AgentPool.start(
        PoolConfig(
            name=f"w{uuid.uuid4().hex[:8]}",
            key_prefix=f"t{uuid.uuid4().hex[:8]}",
            redis_url=redis_url,
            simulator=SimulatorConfig(latency_ms=2, latency_sigma=0),
            num_workers=1,
            worker_concurrency=16,
            webhooks=WebhookConfig(allow_private_addresses=True, first_retry_s=0.5, max_retry_s=2.0, **webhooks),
        )
    )


@pytest.fixture(scope="module")
def pool(ray_session: None, redis_url: str) -> Iterator[AgentPool]:
    with hooked_pool(redis_url) as p:
        yield p


def test_every_completion_is_delivered_signed_through_a_receiver_outage(pool: AgentPool) -> None:
    receiver = Receiver()
    receiver.up()
    endpoint = pool.add_webhook("acme", receiver.url, description="test receiver")
    secret = endpoint.pop("secret")
    assert secret.startswith("whsec_") and pool.webhooks("acme") == [endpoint]
    first = pool.run([AgentTask(tenant="acme", prompt=f"sim: answer before {i}") for i in range(5)])
    wait_for(lambda: len(receiver.got) >= 5, 20)
    receiver.down()
    outage_started = time.monotonic()
    during = pool.run([AgentTask(tenant="acme", prompt=f"sim: answer during {i}") for i in range(20)])
    time.sleep(max(0.0, 20 - (time.monotonic() - outage_started)))  # down for 20 s
    receiver.up()
    expected = {r.task_id: r for r in first + during}
    wait_for(lambda: {json.loads(b)["data"]["task_id"] for _, b in receiver.got} >= set(expected), 30)
    by_id: dict[str, dict[str, Any]] = {}
    for headers, body in receiver.got:
        message = verify(body, headers, secret)  # every delivery's signature checks out
        assert message["type"] == "run.completed"
        by_id[headers["webhook-id"]] = message  # repeats (at least once) fold by webhook-id
    assert set(by_id) == {f"msg_{task_id}" for task_id in expected}
    for message in by_id.values():
        assert message["data"] == expected[message["data"]["task_id"]].model_dump(mode="json")
    with pytest.raises(WebhookVerificationError):
        verify(receiver.got[0][1], receiver.got[0][0], new_secret())  # the wrong secret fails
    log = pool.webhook_deliveries("acme", during[0].task_id)
    assert [a["ok"] for a in log][-1] is True and not any(a["ok"] for a in log[:-1])
    assert len(log) >= 3 and log[0]["error"]  # refused while down, retried with backoff
    assert pool.dead_webhooks("acme") == []
    assert pool.remove_webhook("acme", endpoint["id"]) and pool.webhooks("acme") == []
    receiver.down()


def test_deliveries_never_hold_a_worker(pool: AgentPool) -> None:
    receiver = Receiver()  # never up: every delivery fails and is retried
    endpoint = pool.add_webhook("initech", receiver.url)
    started = time.monotonic()
    results = pool.run([AgentTask(tenant="initech", prompt=f"sim: answer {i}") for i in range(50)])
    assert all(r.ok for r in results) and time.monotonic() - started < 20
    assert pool.status()["in_flight"] == 0
    pool.remove_webhook("initech", endpoint["id"])


def test_a_receiver_that_keeps_failing_ends_in_the_dead_letters(redis_url: str, ray_session: None) -> None:
    receiver = Receiver(status=500)
    receiver.up()
    with hooked_pool(redis_url, give_up_after_s=3.0) as pool:
        pool.add_webhook("acme", receiver.url)
        (result,) = pool.run([AgentTask(tenant="acme", prompt="sim: answer doomed")])
        wait_for(lambda: pool.dead_webhooks("acme"), 30)
        (dead,) = pool.dead_webhooks("acme")
        assert dead["task_id"] == result.task_id and dead["error"] == "HTTP 500" and dead["attempts"] >= 2
        log = pool.webhook_deliveries("acme", result.task_id)
        assert [a["status_code"] for a in log] == [500] * len(log) and len(log) == dead["attempts"]
        deliverer = ray.get_actor(f"{pool.config.name}-webhooks-0", namespace="agentpool")
        assert ray.get(deliverer.stats.remote())["dead"] == 1
    receiver.down()


def test_an_endpoint_gets_the_events_it_chose(pool: AgentPool) -> None:
    receiver = Receiver()
    receiver.up()
    endpoint = pool.add_webhook("hooli", receiver.url, events=["run.queued", "run.completed"])
    queued_only = pool.add_webhook("hooli", receiver.url + "/queued", events=["run.queued"])
    results = pool.run([AgentTask(tenant="hooli", prompt=f"sim: answer {i}") for i in range(3)])
    wait_for(lambda: len(receiver.got) >= 9, 20)  # 3 queued + 3 completed, and 3 queued
    time.sleep(0.5)  # nothing more comes
    by_type: dict[str, set[str]] = {}
    for headers, body in receiver.got:
        secret = endpoint["secret"]
        try:
            message = verify(body, headers, secret)
        except WebhookVerificationError:
            message = verify(body, headers, queued_only["secret"])
        task_id = message["data"]["task_id"]
        by_type.setdefault(message["type"], set()).add(task_id)
        if message["type"] == "run.queued":
            assert message["data"]["event"]["priority"] == "standard" and headers["webhook-id"] != f"msg_{task_id}"
    assert len(receiver.got) == 9
    assert by_type == {"run.queued": {r.task_id for r in results}, "run.completed": {r.task_id for r in results}}
    with pytest.raises(InvalidWebhook, match="unknown webhook event"):
        pool.add_webhook("hooli", receiver.url, events=["run.exploded"])
    for e in (endpoint, queued_only):
        pool.remove_webhook("hooli", e["id"])
    receiver.down()
