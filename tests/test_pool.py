"""Whole batches through `AgentPool`: real Ray actors, real Redis, the SDK over HTTP."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import pytest
import ray
import redis

from agentpool import AgentPool, AgentResult, AgentTask, PoolConfig, SimulatorConfig, TenantPolicy
from agentpool.errors import PoolNotRunning

pytestmark = pytest.mark.usefixtures("ray_session")


def config(redis_url: str, **overrides: object) -> PoolConfig:
    base: dict[str, object] = {
        "name": f"p{uuid.uuid4().hex[:8]}",
        "key_prefix": f"t{uuid.uuid4().hex[:8]}",
        "redis_url": redis_url,
        "tool_modules": ["tests.toolkit"],
        "simulator": SimulatorConfig(latency_ms=5, latency_sigma=0.2),
        "num_workers": 2,
        "worker_concurrency": 16,
        "tenants": {"beta": TenantPolicy(allowed_tools=["calculator", "shout"], max_concurrency=4)},
    }
    return PoolConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def pool(redis_url: str) -> Iterator[AgentPool]:
    p = AgentPool.start(config(redis_url))
    yield p
    status = p.status()
    assert status["queued"] == 0 and status["in_flight"] == 0, status  # nothing left in flight
    p.shutdown()


def batch(n: int) -> list[AgentTask]:
    prompts = [
        ("What is {i}*1000+7?", ["calculator"]),
        ('sim: tool shout {{"text": "hello {i}"}}', ["shout"]),
        ("Tell me about Redis streams ({i})", ["web_search"]),
        ("Just say something ({i})", []),
    ]
    tasks = []
    for i in range(n):
        prompt, tools = prompts[i % len(prompts)]
        tenant = "acme" if i % 2 == 0 else "beta"
        if tenant == "beta" and "web_search" in tools:
            tools = ["calculator"]
        tasks.append(AgentTask(tenant=tenant, prompt=prompt.format(i=i), tools=tools))
    return tasks


def test_a_batch_across_two_tenants(pool: AgentPool, redis_url: str) -> None:
    tasks = batch(40)
    refs = pool.submit(tasks)
    assert len(refs) == 40 and all(isinstance(r, ray.ObjectRef) for r in refs)
    results: list[AgentResult] = ray.get(refs)
    assert [r.task_id for r in results] == [t.task_id for t in tasks]  # input order
    assert {r.status for r in results} == {"succeeded"}, [r.error for r in results if not r.ok]
    for task, r in zip(tasks, results, strict=True):
        assert r.tenant == task.tenant and r.trace_id and len(r.trace_id) == 32
        assert r.usage.cost_usd > 0 and r.timings.total_ms >= r.timings.run_ms > 0
        if task.prompt.startswith("What is"):
            i = int(task.prompt.split()[2].split("*")[0])
            assert str(i * 1000 + 7) in r.answer
    for tenant in ("acme", "beta"):
        from_redis = {r.task_id: r for r in pool.results(tenant).read()}
        mine = {r.task_id: r for r in results if r.tenant == tenant}
        assert from_redis == mine  # the same results, and only this tenant's
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    events = client.xrange(f"{pool.config.key_prefix}:{{acme}}:events")
    kinds = {fields["event"] for _, fields in events}
    assert {"task_admitted", "llm_call", "tool_call", "tool_result", "task_end"} <= kinds


def test_example_from_the_readme(pool: AgentPool) -> None:
    refs = pool.submit([AgentTask(tenant="acme", prompt="What is 1234*5678?", tools=["calculator"])])
    (result,) = ray.get(refs)
    assert result.status == "succeeded" and "7006652" in result.answer
    assert result.task_id in {r.task_id for r in pool.results("acme").read()}


def test_the_same_task_id_twice_runs_once(pool: AgentPool, redis_url: str) -> None:
    task = AgentTask(tenant="acme", prompt="sim: delay 100\nsim: answer once")
    first, second = ray.get(pool.submit([task, task]))
    again = pool.run([task])[0]
    assert first == second == again
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    entries = client.xrange(f"{pool.config.key_prefix}:{{acme}}:results")
    assert [f["task_id"] for _, f in entries].count(task.task_id) == 1


def test_tenant_tool_allowlist_and_invented_tools(pool: AgentPool) -> None:
    denied, invented = pool.run(
        [
            AgentTask(tenant="beta", prompt="search", tools=["web_search"]),
            AgentTask(tenant="acme", prompt="sim: tool explode {}\nsim: answer ok", tools=["calculator"]),
        ]
    )
    assert denied.status == "rejected" and denied.error.type == "UnknownTool" and not denied.error.retryable
    assert invented.status == "succeeded" and invented.tool_calls[0].error_kind == "not_allowed"


def test_each_stop_reason_surfaces_through_the_pool(pool: AgentPool) -> None:
    tool_loop = "\n".join(['sim: tool shout {"text": "a"}'] * 5)
    results = pool.run(
        [
            AgentTask(tenant="acme", prompt=tool_loop, tools=["shout"], max_iterations=2),
            AgentTask(tenant="acme", prompt=tool_loop + "\nsim: output_tokens 50", tools=["shout"], token_budget=200),
            AgentTask(tenant="acme", prompt="sim: delay 3000\nsim: answer late", timeout_s=0.5),
            AgentTask(tenant="acme", prompt="sim: fail 400 always"),
            AgentTask(tenant="acme", prompt="sim: fail 529\nsim: answer recovered"),
            AgentTask(
                tenant="acme", prompt='sim: answer {"n": 3}', output_schema={"type": "object", "required": ["n"]}
            ),
        ]
    )
    assert [r.status for r in results] == [
        "iteration_cap",
        "budget_exhausted",
        "timed_out",
        "failed",
        "succeeded",
        "succeeded",
    ]
    assert results[4].llm_attempts == 2 and results[5].answer == {"n": 3}
    assert results[2].timings.run_ms < 2000


def test_invalid_input_is_refused_before_anything_is_sent(pool: AgentPool) -> None:
    from agentpool.errors import InvalidTaskInput

    with pytest.raises(InvalidTaskInput) as info:
        pool.submit([{"tenant": "acme", "prompt": "ok"}, {"tenant": "bad tenant!", "prompt": "x"}])
    assert [(e["index"], e["loc"]) for e in info.value.errors] == [(1, ["tenant"])]


def test_strict_tenants_and_full_queue_reject_fast(redis_url: str) -> None:
    cfg = config(
        redis_url,
        strict_tenants=True,
        tenants={"acme": TenantPolicy()},
        num_workers=1,
        worker_concurrency=1,
        max_queued=2,
    )
    with AgentPool.start(cfg) as p:
        slow = [AgentTask(tenant="acme", prompt=f"sim: delay 300\nsim: answer {i}") for i in range(6)]
        refs = p.submit(slow)
        stranger = p.run([AgentTask(tenant="nobody", prompt="hi")])[0]
        results = ray.get(refs)
        assert stranger.status == "rejected" and stranger.error.type == "UnknownTenant"
        statuses = [r.status for r in results]
        assert statuses.count("succeeded") >= 3 and "rejected" in statuses
        shed = [r for r in results if r.status == "rejected"]
        assert all(r.error.type == "Overloaded" and r.error.retryable and r.retry_after_s > 0 for r in shed)
        assert {r.task_id for r in p.results("acme").read()} == {t.task_id for t in slow}
        shed_events = [
            json.loads(f["data"])
            for _, f in redis.Redis.from_url(redis_url, decode_responses=True).xrange(
                f"{cfg.key_prefix}:{{acme}}:events"
            )
            if f["event"] == "shed"
        ]
        assert len(shed_events) == len(shed) and shed_events[0]["reason"] == "queue_full"
    with pytest.raises(PoolNotRunning):
        p.submit([AgentTask(tenant="acme", prompt="late")])


def test_tenant_concurrency_cap_holds(pool: AgentPool) -> None:
    tasks = [AgentTask(tenant="beta", prompt="sim: delay 200\nsim: answer x") for _ in range(12)]
    refs = pool.submit(tasks)
    peak = 0
    while True:
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0.05)
        peak = max(peak, pool.status()["in_flight_by_tenant"].get("beta", 0))
        if len(ready) == len(refs):
            break
    assert 1 <= peak <= 4
    assert {r.status for r in ray.get(refs)} == {"succeeded"}


def test_connect_finds_a_running_pool(pool: AgentPool) -> None:
    other = AgentPool.connect(pool.config.name)
    (r,) = other.run([AgentTask(tenant="acme", prompt="sim: answer via connect")])
    assert r.answer == "via connect" and other.redis_url == pool.redis_url
    with pytest.raises(PoolNotRunning):
        AgentPool.connect("no-such-pool")


def test_cancelled_tasks_give_back_their_slots(pool: AgentPool) -> None:
    """ray.cancel on queued and running tasks: every worker slot comes back (it used to leak
    when a cancelled caller's slot was handed out before its cleanup ran)."""
    refs = pool.submit([AgentTask(tenant="acme", prompt=f"sim: delay 300\nsim: answer {i}") for i in range(80)])
    ray.wait(refs, num_returns=1, timeout=10)
    for ref in refs:
        ray.cancel(ref)
    (after,) = pool.run([AgentTask(tenant="acme", prompt="sim: answer after the cancel")])
    assert after.status == "succeeded"
    for _ in range(200):  # the cancelled runs end at their workers, then release their slots
        status = pool.status()
        if status["in_flight"] == 0:
            break
        ray.wait(refs, num_returns=len(refs), timeout=0.05)
    assert status["in_flight"] == 0 and status["queued"] == 0, status
