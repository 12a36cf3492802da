"""The pool on a Redis Cluster (`redis+cluster://`), with real processes
(`tests/redis_cluster.py`: three primaries and their replicas): tenants spread over every
primary, one primary SIGKILLed mid-batch and its replica taking over, and every accepted
task ending with exactly one final record; reads that span tenants (results for `submit`,
webhook deliveries) go slot by slot."""

from __future__ import annotations

import json
import time
import uuid
from collections import Counter

import pytest
import ray
import redis

from agentpool import AgentPool, AgentTask, PoolConfig, SimulatorConfig
from agentpool.cluster.acl import create_tenant_credentials, display_url, revoke_tenant_credentials
from agentpool.cluster.clients import sync_client
from agentpool.cluster.keys import Keys
from agentpool.cluster.slots import by_slot
from agentpool.config import WebhookConfig
from agentpool.redis_url import cluster_target
from agentpool.vocabulary import EventType
from agentpool.webhooks import verify
from tests.redis_cluster import ClusterGroup
from tests.test_webhooks import Receiver, wait_for
from tests.toolkit import nap_tasks

pytestmark = pytest.mark.usefixtures("ray_session")

TENANTS = [f"tenant{i}" for i in range(6)]


def _tasks(n: int, nap_s: float) -> list[AgentTask]:
    """`nap_tasks`, their tenants taken in turn."""
    return [t.model_copy(update={"tenant": TENANTS[i % len(TENANTS)]}) for i, t in enumerate(nap_tasks(n, nap_s))]


def test_a_primary_lost_mid_batch_on_a_redis_cluster_loses_and_duplicates_no_task() -> None:
    # Two replicas a shard: the shard that loses its primary still has one to confirm writes.
    with ClusterGroup(replicas=2) as group:
        name = f"rc{uuid.uuid4().hex[:6]}"
        spread = {group.primary_for(f"{name}:{{{t}}}:results").port for t in TENANTS}
        assert len(spread) == 3  # the tenants' keys live on every primary
        config = PoolConfig(
            name=name,
            key_prefix=name,
            redis_url=group.url,
            redis_wait_replicas=1,  # every primary WAITs for its replica
            tool_modules=["tests.toolkit"],
            simulator=SimulatorConfig(latency_ms=2, latency_sigma=0),
            num_workers=2,
            worker_concurrency=8,
        )
        with AgentPool.start(config) as pool:
            tasks = _tasks(90, 0.3)
            refs = pool.submit(tasks)
            ready, _ = ray.wait(refs, num_returns=10, timeout=60)
            victim = group.primary_for(f"{name}:{{{TENANTS[0]}}}:results")
            group.kill(victim)
            killed = time.monotonic()
            group.wait_failover(victim)
            promoted_s = time.monotonic() - killed
            results = ray.get(refs, timeout=300)
            deadline = time.monotonic() + 60  # records written while a primary was away
            while (status := pool.status())["redis"]["pending_writes"] and time.monotonic() < deadline:
                time.sleep(0.2)
            consumed = sorted(r.task_id for t in TENANTS for r in pool.results(t).read())
        client = group.client()
        counts: Counter[str] = Counter()
        admitted = 0
        for tenant in TENANTS:
            counts.update(fields["task_id"] for _, fields in client.xrange(f"{name}:{{{tenant}}}:results"))
            admitted += client.hlen(f"{name}:{{{tenant}}}:admitted:{name}")
        client.close()
        # A tenant's own credentials, on every node: its keys and nothing else.
        tenant_url = create_tenant_credentials(group.url, TENANTS[0], keys=Keys(name))
        with sync_client(tenant_url, decode_responses=True) as tenant:
            own = tenant.xlen(f"{name}:{{{TENANTS[0]}}}:results")
            with pytest.raises(redis.exceptions.NoPermissionError):
                tenant.xlen(f"{name}:{{{TENANTS[1]}}}:results")
        assert revoke_tenant_credentials(group.url, TENANTS[0], keys=Keys(name))
    assert own == len(tasks) // len(TENANTS)
    assert len(ready) < len(tasks) and promoted_s < 30
    assert [r.status for r in results] == ["succeeded"] * len(tasks), [r.error for r in results if r.error][:3]
    assert [r.answer for r in results] == [f"ok {i}" for i in range(len(tasks))]
    lost = [t.task_id for t in tasks if not counts[t.task_id]]
    assert not lost and max(counts.values()) == 1, (lost, counts.most_common(3))
    assert consumed == sorted(t.task_id for t in tasks)
    assert admitted == 0
    assert status["redis"]["reachable"] and status["redis"]["pending_writes"] == 0


def test_webhooks_of_tenants_on_every_primary_are_all_delivered() -> None:
    with ClusterGroup() as group:
        name = f"rw{uuid.uuid4().hex[:6]}"
        assert len({group.primary_for(f"{name}:{{{t}}}:results").port for t in TENANTS[:3]}) > 1
        config = PoolConfig(
            name=name,
            key_prefix=name,
            redis_url=group.url,
            simulator=SimulatorConfig(latency_ms=2, latency_sigma=0),
            num_workers=1,
            worker_concurrency=16,
            webhooks=WebhookConfig(allow_private_addresses=True, first_retry_s=0.5, max_retry_s=2.0),
        )
        receiver = Receiver()
        receiver.up()
        try:
            with AgentPool.start(config) as pool:
                secrets = {t: pool.add_webhook(t, receiver.url)["secret"] for t in TENANTS[:3]}
                done = pool.run([AgentTask(tenant=TENANTS[i % 3], prompt=f"sim: answer {i}") for i in range(30)])
                wait_for(
                    lambda: {json.loads(b)["data"]["task_id"] for _, b in receiver.got} >= {r.task_id for r in done}, 30
                )
                followed = list(pool.events(done[0].task_id, follow=False))
        finally:
            receiver.down()
    tenants = {r.task_id: r.tenant for r in done}
    for headers, body in receiver.got:
        message = verify(body, headers, secrets[tenants[json.loads(body)["data"]["task_id"]]])
        assert message["type"] == "run.completed"
    assert followed and followed[-1].event == EventType.TASK_END


def test_cluster_urls_parse_and_print_masked() -> None:
    url = "redis+cluster://app:s3cret@10.0.0.1:7000,10.0.0.2,10.0.0.3:7002/0"
    target = cluster_target(url)
    assert target is not None
    assert target.nodes == (("10.0.0.1", 7000), ("10.0.0.2", 6379), ("10.0.0.3", 7002))
    assert (target.username, target.password, target.ssl) == ("app", "s3cret", False)
    assert cluster_target("rediss+cluster://h:1").ssl is True  # type: ignore[union-attr]
    assert cluster_target("redis://h:6379/0") is None
    assert display_url(url) == "redis+cluster://app:***@10.0.0.1:7000,10.0.0.2,10.0.0.3:7002/0"
    assert PoolConfig(redis_url=url).redis_url == url
    for bad in ("redis+cluster://h:1/3", "redis+cluster://h:99999", "redis+cluster://h:x"):
        with pytest.raises(ValueError):
            PoolConfig(redis_url=bad)


def test_streams_split_by_slot_keep_their_positions_and_a_tenant_keeps_one_slot() -> None:
    streams = {"p:{a}:results": "0", "p:{b}:results": "5-1", "p:{a}:events": "$", "p:{c}:results": "0"}
    groups = by_slot(streams)
    assert sorted(len(g) for g in groups) == [1, 1, 2]
    assert {"p:{a}:results": "0", "p:{a}:events": "$"} in groups
    assert {k: v for g in groups for k, v in g.items()} == streams
