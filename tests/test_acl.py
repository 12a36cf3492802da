"""Tenant isolation in Redis: per-tenant ACL users against the real server.

A tenant's credentials read its own keys with the commands `ResultsReader` uses and get
`NOPERM` for everything else: other tenants' keys (including one whose name starts with
its own), key listing, writes, scripts, admin and pub/sub.
"""

from __future__ import annotations

import fnmatch
import uuid
from collections.abc import Iterator

import pytest
import redis
from hypothesis import given
from hypothesis import strategies as st

from agentpool.cluster.acl import create_tenant_credentials, display_url, revoke_tenant_credentials, tenant_rules
from agentpool.cluster.keys import Keys
from agentpool.cluster.reader import ResultsReader
from agentpool.cluster.redis_server import EmbeddedRedis
from agentpool.errors import InvalidTask, StoreError
from agentpool.models import AgentResult

TENANT_NAMES = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,20}", fullmatch=True)


@pytest.fixture
def seeded(redis_url: str, key_prefix: str) -> Iterator[tuple[Keys, redis.Redis]]:
    keys = Keys(key_prefix)
    admin = redis.Redis.from_url(redis_url, decode_responses=True)
    for tenant in ("acme", "acme2", "globex"):
        record = AgentResult(task_id="t1", tenant=tenant, status="succeeded", answer=f"for {tenant}")
        admin.set(keys.result(tenant, "t1"), record.model_dump_json())
        admin.xadd(keys.results(tenant), {"task_id": "t1", "status": "succeeded", "result": record.model_dump_json()})
        admin.xadd(keys.events(tenant), {"event": "task_end", "task_id": "t1"})
        admin.set(keys.checkpoint(tenant, "t1"), "{}")
        admin.hset(keys.usage(tenant, "2026-11-21"), "tokens", 10)
    yield keys, admin
    admin.close()


def test_a_tenant_reads_its_own_keys_and_gets_noperm_on_every_other(
    seeded: tuple[Keys, redis.Redis], redis_url: str
) -> None:
    keys, _ = seeded
    url = create_tenant_credentials(redis_url, "acme", keys=keys)
    reader = ResultsReader(url, "acme", keys=keys)
    assert [r.answer for r in reader.read()] == ["for acme"]
    assert reader.get("t1").answer == "for acme"
    assert [r.answer for r in reader.follow(block_ms=10, idle_timeout_s=0)] == ["for acme"]  # consumer group
    reader.close()

    tenant = redis.Redis.from_url(url, decode_responses=True)
    assert tenant.hget(keys.usage("acme", "2026-11-21"), "tokens") == "10"
    refused = {
        "other tenant's record": lambda: tenant.get(keys.result("globex", "t1")),
        "tenant whose name extends ours": lambda: tenant.get(keys.result("acme2", "t1")),
        "other tenant's stream": lambda: tenant.xrange(keys.results("globex")),
        "other tenant's events": lambda: tenant.xread({keys.events("globex"): "0"}),
        "other tenant's checkpoint": lambda: tenant.get(keys.checkpoint("globex", "t1")),
        "two keys, one not ours": lambda: tenant.mget(keys.result("acme", "t1"), keys.result("globex", "t1")),
        "a key outside the prefix": lambda: tenant.get("other:{acme}:result:t1"),
        "KEYS": lambda: tenant.keys("*"),
        "SCAN": lambda: tenant.scan(0),
        "write to our own record": lambda: tenant.set(keys.result("acme", "t1"), "forged"),
        "delete our own stream": lambda: tenant.delete(keys.results("acme")),
        "append to our stream": lambda: tenant.xadd(keys.results("acme"), {"x": "1"}),
        "EVAL": lambda: tenant.eval("return redis.call('GET', KEYS[1])", 1, keys.result("globex", "t1")),
        "FLUSHALL": lambda: tenant.flushall(),
        "CONFIG": lambda: tenant.config_get("*"),
        "ACL": lambda: tenant.acl_list(),
        "PUBLISH": lambda: tenant.publish("channel", "x"),
        "SELECT": lambda: tenant.execute_command("SELECT", 1),
    }
    for what, attempt in refused.items():
        with pytest.raises(redis.exceptions.NoPermissionError):
            attempt()
            pytest.fail(f"{what} was allowed")
    assert "for acme" in tenant.get(keys.result("acme", "t1"))  # nothing was forged
    tenant.close()
    revoke_tenant_credentials(redis_url, "acme", keys=keys)


def test_credentials_rotate_and_revoke(seeded: tuple[Keys, redis.Redis], redis_url: str) -> None:
    keys, _ = seeded
    first = create_tenant_credentials(redis_url, "globex", keys=keys)
    second = create_tenant_credentials(redis_url, "globex", keys=keys)
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis.from_url(first).ping()
    assert redis.Redis.from_url(second).ping()
    assert revoke_tenant_credentials(redis_url, "globex", keys=keys)
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis.from_url(second).ping()
    assert not revoke_tenant_credentials(redis_url, "globex", keys=keys)
    assert "***" in display_url(second) and second.split(":")[2].split("@")[0] not in display_url(second)


@pytest.mark.parametrize("name", ["*", "acme*", "a}b", "{acme}", "a:b", "a?c", "[ab]", "a b", "", "a\\b", "-x"])
def test_tenant_names_that_could_widen_the_pattern_are_refused(redis_url: str, name: str) -> None:
    with pytest.raises(InvalidTask, match="not valid"):
        create_tenant_credentials(redis_url, name)


def test_the_embedded_server_refuses_clients_without_the_password() -> None:
    with EmbeddedRedis(appendonly=False) as server:
        with pytest.raises(redis.exceptions.AuthenticationError):
            redis.Redis(host="127.0.0.1", port=server.port).ping()
        assert redis.Redis.from_url(server.url).ping()


@given(TENANT_NAMES, TENANT_NAMES, st.sampled_from(["result:t", "results", "events", "checkpoint:x", "usage:d"]))
def test_a_tenant_pattern_matches_only_that_tenant_keys(ours: str, other: str, suffix: str) -> None:
    keys = Keys(f"p{uuid.uuid4().hex[:4]}")
    pattern = next(r[1:] for r in tenant_rules(keys, ours, "pw") if r.startswith("~"))
    assert fnmatch.fnmatchcase(f"{keys.prefix}:{{{ours}}}:{suffix}", pattern)
    if other != ours:
        assert not fnmatch.fnmatchcase(f"{keys.prefix}:{{{other}}}:{suffix}", pattern)


@pytest.mark.usefixtures("ray_session")
def test_a_batch_writes_each_tenant_only_under_its_own_prefix(redis_url: str) -> None:
    from agentpool import AgentPool
    from tests.test_pool import batch, config

    pool = AgentPool.start(config(redis_url))
    try:
        tasks = batch(24)
        results = pool.run(tasks)
        owner = {t.task_id: t.tenant for t in tasks}
        assert {r.tenant for r in results} == {"acme", "beta"}
        keys = Keys(pool.config.key_prefix)
        admin = redis.Redis.from_url(redis_url, decode_responses=True)
        checked = 0
        for key in admin.scan_iter(f"{keys.prefix}:*", count=1000):
            tenant = key.split("{", 1)[1].split("}", 1)[0]
            kind = admin.type(key)
            if kind == "string" and ":result:" in key:
                assert AgentResult.model_validate_json(admin.get(key)).tenant == tenant, key
            elif kind == "stream":
                for _, fields in admin.xrange(key):
                    if "task_id" in fields:
                        assert owner[fields["task_id"]] == tenant, (key, fields)
            checked += 1
        assert checked >= 6
        admin.close()

        url = pool.tenant_credentials("acme")
        reader = ResultsReader(url, "acme", keys=keys)
        assert sorted(r.task_id for r in reader.read()) == sorted(t for t, who in owner.items() if who == "acme")
        with pytest.raises(StoreError, match="refused access"):  # NOPERM, as agentpool's error
            ResultsReader(url, "beta", keys=keys).get(next(t for t, who in owner.items() if who == "beta"))
        reader.close()
        assert pool.revoke_tenant_credentials("acme")
    finally:
        pool.shutdown()
