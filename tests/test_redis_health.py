"""Redis as a new user meets it: a bad or unreachable URL is refused before anything is
accepted, an outage later is reported (status, a warning) while the outbox rides it out,
readers raise agentpool's typed errors, and `follow()` idles for as long as it likes."""

from __future__ import annotations

import logging
import threading
import time
from urllib.parse import urlsplit

import pytest
import ray

from agentpool import AgentPool, AgentResult, AgentTask, PoolConfig
from agentpool.cluster import reader as reader_module
from agentpool.cluster.keys import Keys
from agentpool.cluster.reader import ResultsReader
from agentpool.cluster.redis_server import EmbeddedRedis
from agentpool.cluster.store import ResultStore
from agentpool.errors import ConfigError, InvalidConfig, StoreError, StoreUnavailable
from tests.pools import small_config

pytestmark = pytest.mark.usefixtures("ray_session")


def _config(redis_url: str) -> PoolConfig:
    return small_config(redis_url, tag="h")


@pytest.mark.parametrize("url", ["notaurl", "http://localhost:6379", "redis://localhost:99999/0", "redis://"])
def test_a_malformed_url_is_refused_naming_the_variable(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENTPOOL_REDIS_URL", url)
    with pytest.raises(InvalidConfig, match="AGENTPOOL_REDIS_URL") as info:
        PoolConfig()
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="redis://"):  # from arguments: pydantic's own error
        PoolConfig(redis_url=url)


def test_an_unreachable_redis_is_refused_before_any_actor_starts() -> None:
    started = time.monotonic()
    with pytest.raises(ConfigError, match=r"AGENTPOOL_REDIS_URL .*cannot reach Redis at redis://:\*\*\*@127.0.0.1:1/0"):
        AgentPool.start(_config("redis://:hunter2@127.0.0.1:1/0"))
    assert time.monotonic() - started < 8  # no actor was started and waited for
    assert not [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith("h")]


def test_an_outage_is_reported_and_readers_raise_typed_errors(caplog: pytest.LogCaptureFixture) -> None:
    server = EmbeddedRedis()
    url = server.start()
    try:
        with AgentPool.start(_config(url)) as pool:
            assert pool.run([AgentTask(tenant="acme", prompt="sim: answer before")])[0].ok
            assert pool.status()["redis"] == {
                "reachable": True,
                "error": None,
                "pending_writes": 0,
                "pending_events": 0,
                "unreplicated": 0,  # no replica was asked for (`redis_wait_replicas`)
                "unreachable_since_unix": None,
            }
            server.stop()
            during = pool.run([AgentTask(tenant="acme", prompt="sim: answer during")])[0]
            assert during.ok  # the caller gets its result; the record waits in an outbox
            with caplog.at_level(logging.WARNING, logger="agentpool"):
                health = pool.status()["redis"]
            assert health["reachable"] is False and health["error"]
            assert health["pending_writes"] >= 1 and health["unreachable_since_unix"] is not None
            assert any("wait in the pool's memory" in r.getMessage() for r in caplog.records)
            reader = pool.results("acme")
            with pytest.raises(StoreUnavailable, match=r"cannot reach Redis at redis://default:\*\*\*@127.0.0.1"):
                list(reader.read())
            with pytest.raises(StoreUnavailable):
                reader.get(during.task_id)
            server.restart(down_s=0)
            deadline = time.monotonic() + 30
            while pool.status()["redis"]["pending_writes"] and time.monotonic() < deadline:
                time.sleep(0.2)
            assert pool.results("acme").get(during.task_id) == during  # written once it was back
    finally:
        server.stop()


def test_a_refused_credential_is_a_store_error() -> None:
    with EmbeddedRedis() as server:  # a password of its own, whatever Redis the suite uses
        password = urlsplit(server.url).password
        assert password
        bad = server.url.replace(f":{password}@", f":wrong{password}@", 1)
        with pytest.raises(StoreError, match="refused the credentials") as info:
            ResultsReader(bad, "acme").get("x")
    assert "wrong" not in str(info.value)


def test_follow_idles_past_the_socket_timeout_and_then_yields(
    redis_url: str, key_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """redis-py's socket timeout (5 s by default) used to end an idle follow() with a
    TimeoutError. Now a read blocks at most `MAX_BLOCK_MS` (20 s; a longer `block_ms` is
    clamped) on a socket that waits longer, so idling is a loop of empty reads, for minutes
    or for ever. Here the clamp is 6 s, so that 8 s idle pass both 5 s and one whole block."""
    monkeypatch.setattr(reader_module, "MAX_BLOCK_MS", 6_000)
    keys = Keys(key_prefix)
    reader = ResultsReader(redis_url, "acme", keys=keys)
    got: list[AgentResult] = []
    failed: list[BaseException] = []

    def consume() -> None:
        try:
            for result in reader.follow(group="g", block_ms=600_000, idle_timeout_s=120):
                got.append(result)
                return
        except BaseException as exc:  # reported to the test thread
            failed.append(exc)

    consumer = threading.Thread(target=consume, daemon=True)
    consumer.start()
    time.sleep(8)  # past redis-py's default socket timeout, and past one whole (6 s) block, idle
    assert consumer.is_alive() and not failed, failed

    async def write() -> None:
        store = ResultStore(redis_url, keys=keys)
        await store.write_result(AgentResult(task_id="late", tenant="acme", status="succeeded", answer="at last"))
        await store.close()

    import asyncio

    asyncio.run(write())
    consumer.join(timeout=30)
    assert not failed and [r.task_id for r in got] == ["late"]
