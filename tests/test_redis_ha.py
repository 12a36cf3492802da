"""The pool on a Redis primary that Sentinel fails over (`redis+sentinel://`), with real
processes (`tests/redis_ha.py`): the primary SIGKILLed mid-batch, a replica promoted, and
every accepted task ending with exactly one final record, read from the new primary."""

from __future__ import annotations

import time
import uuid
from collections import Counter

import pytest
import ray
import redis

from agentpool import AgentPool, PoolConfig, SimulatorConfig
from agentpool.cluster.acl import display_url
from agentpool.cluster.clients import sync_client
from agentpool.redis_url import sentinel_target
from tests.redis_ha import SentinelGroup
from tests.toolkit import nap_tasks

pytestmark = pytest.mark.usefixtures("ray_session")


def test_a_sentinel_failover_mid_batch_loses_and_duplicates_no_task() -> None:
    with SentinelGroup() as ha:
        name = f"ha{uuid.uuid4().hex[:6]}"
        config = PoolConfig(
            name=name,
            key_prefix=name,
            redis_url=ha.url,
            redis_wait_replicas=1,  # an admission or record counts once a replica has it
            tool_modules=["tests.toolkit"],
            simulator=SimulatorConfig(latency_ms=2, latency_sigma=0),
            num_workers=2,
            worker_concurrency=8,
        )
        with AgentPool.start(config) as pool:
            tasks = nap_tasks(80, 0.3)
            refs = pool.submit(tasks)
            ready, _ = ray.wait(refs, num_returns=10, timeout=60)
            old = ha.kill_primary()
            killed = time.monotonic()
            new = ha.wait_failover(old)
            promoted_s = time.monotonic() - killed
            results = ray.get(refs, timeout=300)
            deadline = time.monotonic() + 60  # records written while Redis was away: out of the outboxes
            while (status := pool.status())["redis"]["pending_writes"] and time.monotonic() < deadline:
                time.sleep(0.2)
            consumed = [r.task_id for r in pool.results("acme").read()]
        with ha.client() as primary:
            stream = f"{name}:{{acme}}:results"
            counts = Counter(fields["task_id"] for _, fields in primary.xrange(stream))
            admitted = primary.hlen(f"{name}:{{acme}}:admitted:{name}")
    assert len(ready) < len(tasks) and new != old and promoted_s < 30
    assert [r.status for r in results] == ["succeeded"] * len(tasks)
    lost = [t.task_id for t in tasks if not counts[t.task_id]]
    assert not lost and max(counts.values()) == 1, (lost, counts.most_common(3))  # none lost, none twice
    assert sorted(consumed) == sorted(t.task_id for t in tasks)  # through the Sentinel URL too
    assert admitted == 0  # every admission ended with its record
    assert status["redis"]["reachable"] and status["redis"]["pending_writes"] == 0


def test_sentinel_urls_parse_and_print_masked() -> None:
    url = "redis+sentinel://app:s3cr%40t@10.0.0.1:26379,10.0.0.2,10.0.0.3:26380/cache/2?sentinel_password=x"
    target = sentinel_target(url)
    assert target is not None
    assert target.sentinels == (("10.0.0.1", 26379), ("10.0.0.2", 26379), ("10.0.0.3", 26380))
    assert (target.service, target.db, target.username, target.password) == ("cache", 2, "app", "s3cr@t")
    assert (target.ssl, target.sentinel_password) == (False, "x")
    assert sentinel_target("redis://localhost:6379/0") is None
    assert sentinel_target("rediss+sentinel://h/svc").ssl is True  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="names its service"):
        sentinel_target("redis+sentinel://h:1")
    with pytest.raises(ValueError):
        PoolConfig(redis_url="redis+sentinel://h:1,h:notaport/svc")
    assert display_url(url) == (
        "redis+sentinel://app:***@10.0.0.1:26379,10.0.0.2,10.0.0.3:26380/cache/2?sentinel_password=***"
    )
    with pytest.raises(redis.ConnectionError):  # no sentinel answers: no primary to find
        sync_client("redis+sentinel://127.0.0.1:1/svc", socket_connect_timeout=0.5).ping()
