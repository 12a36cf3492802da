"""The provider key never leaves the worker that uses it.

A pool runs a batch with a recognisable key against the simulated provider, including a 401
(whose message echoes the key, as a careless gateway's would) and a 400, with every output
turned on: structured events, JSON event log lines, message content on spans, the audit
trail. Then every Redis key, every file under the Ray session's logs, every result and every
exported span and metric point is searched for the key.
"""

from __future__ import annotations

import base64
import json
import pickle
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
import redis
from pydantic import SecretStr
from ray.experimental import internal_kv

from agentpool import AgentPool, AgentResult, AgentTask, PoolConfig
from agentpool.config import RetryPolicy
from agentpool.protocol import provider_key_name
from agentpool.secrets import Scrubber
from agentpool.simulator import SimulatorServer
from tests.otlp_receiver import OTLPReceiver
from tests.test_telemetry import otel_env

pytestmark = pytest.mark.usefixtures("ray_session")

KEY = f"sk-ant-api03-CANARY{uuid.uuid4().hex}{uuid.uuid4().hex}-leakAA"
#: Fragments that would betray a partial leak (a key cut to a length, or its random tail).
FRAGMENTS = [KEY, KEY[:24], KEY[-24:]]


def prompts() -> list[tuple[str, list[str]]]:
    hostile = json.dumps({"type": "error", "error": {"type": "authentication_error", "message": f"bad key {KEY}"}})
    return [
        ("Just say something", []),
        ("What is 6*7?", ["calculator"]),
        ("sim: fail 401", []),  # the simulator echoes the key it was sent
        ("sim: fail 400", []),
        ("sim: fail 529 x1\nsim: answer recovered", []),
        (f"sim: raw {base64.b64encode(hostile.encode()).decode()}", []),  # a 200 that is no message
        ('sim: tool shout {"text": "hi"}', ["shout"]),
    ]


@pytest.fixture(scope="module")
def leaked(redis_url: str, sim_server: SimulatorServer) -> Iterator[tuple[AgentPool, OTLPReceiver, list[AgentResult]]]:
    with OTLPReceiver() as receiver:
        with otel_env(receiver.endpoint, OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT="true"):
            pool = AgentPool.start(
                PoolConfig(
                    name=f"leak{uuid.uuid4().hex[:6]}",
                    key_prefix=f"t{uuid.uuid4().hex[:8]}",
                    redis_url=redis_url,
                    anthropic_api_key=SecretStr(KEY),
                    anthropic_base_url=sim_server.url,
                    tool_modules=["tests.toolkit"],
                    num_workers=1,
                    worker_concurrency=8,
                    retry=RetryPolicy(max_attempts_per_model=2, base_delay_s=0.01, max_delay_s=0.02),
                    fallback_models=[],
                    event_log=True,
                )
            )
        try:
            tasks = [AgentTask(tenant="leaky", prompt=p, tools=t) for p, t in prompts()]
            results = pool.run(tasks)
            pool.flush_telemetry()
            yield pool, receiver, results
        finally:
            pool.shutdown()
    # The key's one copy for the workers goes with the pool.
    assert internal_kv._internal_kv_get(provider_key_name(pool.config.name), namespace="agentpool") is None


def _hits(text: str | bytes) -> list[str]:
    data = text.encode() if isinstance(text, str) else text
    return [f for f in FRAGMENTS if f.encode() in data]


def test_the_batch_exercised_the_failure_paths(leaked: Any) -> None:
    _, _, results = leaked
    by_prompt = {p: r for (p, _), r in zip(prompts(), results, strict=True)}
    assert by_prompt["Just say something"].status == "succeeded"
    unauthorised = by_prompt["sim: fail 401"]
    assert unauthorised.status == "failed" and "authentication_error" in unauthorised.error.message
    assert "[SECRET]" in unauthorised.error.message  # the echoed key was there, and was scrubbed
    assert by_prompt["sim: fail 400"].status == "failed"
    assert by_prompt["sim: fail 529 x1\nsim: answer recovered"].answer == "recovered"


def test_no_redis_key_holds_the_key(leaked: Any, redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    seen = 0
    try:
        for key in client.scan_iter(count=1000):
            kind = client.type(key).decode()
            if kind == "string":
                value: Any = client.get(key)
            elif kind == "hash":
                value = client.hgetall(key)
            elif kind == "stream":
                value = client.xrange(key)
            elif kind == "list":
                value = client.lrange(key, 0, -1)
            elif kind in ("set", "zset"):
                value = client.smembers(key) if kind == "set" else client.zrange(key, 0, -1, withscores=True)
            else:
                value = b""
            seen += 1
            assert not _hits(key + repr(value).encode()), key
    finally:
        client.close()
    assert seen > 10


def test_only_the_agent_workers_receive_the_key(leaked: Any) -> None:
    """The scheduler starts workers but never calls the provider: neither the spawn spec it
    holds nor its configuration carries the key. Workers read it from Ray's store."""
    pool, _, _ = leaked
    scheduler = ray.get_actor(f"{pool.config.name}-scheduler", namespace="agentpool")
    held = ray.get(scheduler.__ray_call__.remote(lambda self: pickle.dumps((self._fleet._spawn_spec, self.config))))
    assert _hits(held) == []
    stored = internal_kv._internal_kv_get(provider_key_name(pool.config.name), namespace="agentpool")
    assert stored == KEY.encode()


def test_no_ray_log_holds_the_key(leaked: Any) -> None:
    _, _, results = leaked
    session = Path(ray._private.worker._global_node.get_session_dir_path())
    files = [p for p in session.rglob("*") if p.is_file() and not p.is_symlink()]
    found_event_lines = False
    for path in files:
        try:
            data = path.read_bytes()
        except OSError:
            continue
        assert not _hits(data), path
        found_event_lines = found_event_lines or results[0].task_id.encode() in data
    assert found_event_lines  # the search did cover the actors' logs: their event lines are there


def test_no_result_span_or_metric_holds_the_key(leaked: Any) -> None:
    _, receiver, results = leaked
    assert not _hits(json.dumps([r.model_dump(mode="json") for r in results]))
    spans = receiver.received.spans
    assert any(s["name"].startswith("chat ") for s in spans)
    assert not _hits(json.dumps(spans, default=str))
    assert not _hits(json.dumps(list(receiver.received.points.values()), default=str))


def test_the_scrubber_masks_exact_and_key_shaped_text() -> None:
    scrub = Scrubber([SecretStr("plain-secret-value-123")])
    assert scrub("x plain-secret-value-123 y") == "x [SECRET] y"
    assert scrub(f"oops {KEY}") == "oops [SECRET]"
    assert scrub("Authorization: Bearer abcdefghijklmnop1234") == "Authorization: [SECRET]"
    assert scrub("nothing here") == "nothing here"


def test_the_key_can_come_from_a_secrets_file(tmp_path: Path) -> None:
    from agentpool.errors import ConfigError

    secret = tmp_path / "anthropic_key"
    secret.write_text(f"{KEY}\n")
    secret.chmod(0o600)
    config = PoolConfig(anthropic_api_key_file=secret)
    assert config.anthropic_api_key.get_secret_value() == KEY and not config.uses_simulator
    assert config.for_actors().anthropic_api_key is None and KEY not in repr(config)
    secret.chmod(0o644)
    with pytest.raises(ConfigError, match="readable by every user") as info:
        PoolConfig(anthropic_api_key_file=secret)
    assert not _hits(str(info.value))
    with pytest.raises(ConfigError, match="cannot read"):
        PoolConfig(anthropic_api_key_file=tmp_path / "missing")


def test_log_records_are_scrubbed_with_their_tracebacks() -> None:
    import logging

    from agentpool.secrets import ScrubFilter

    try:
        raise RuntimeError(f"request failed with x-api-key={KEY}")
    except RuntimeError:
        record = logging.LogRecord("anthropic", logging.ERROR, __file__, 1, "sent %s", (KEY,), exc_info=True)
        record.exc_info = sys.exc_info()
    ScrubFilter(Scrubber([KEY])).filter(record)
    assert not _hits(logging.Formatter().format(record))


def test_the_pool_refuses_a_ray_cluster_without_token_auth(monkeypatch: pytest.MonkeyPatch) -> None:
    from agentpool import launcher
    from agentpool.errors import ConfigError
    from agentpool.launch import ray_auth_enabled

    assert ray_auth_enabled()  # the suite's own cluster runs with token authentication
    monkeypatch.setattr(launcher, "ray_auth_enabled", lambda: False)  # as on a cluster started without it
    with pytest.raises(ConfigError, match="token authentication"):
        AgentPool.start(PoolConfig(name=f"noauth{uuid.uuid4().hex[:6]}"))
