"""Spending less on a real pool: per-task dollar caps, and the response cache (hits answered
without a provider call, scoped to their tenant, counted per tenant; nothing kept from a
truncated or failed call)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from agentpool import AgentPool, AgentTask, CacheMode, PoolConfig, SimulatorConfig, TenantPolicy

pytestmark = pytest.mark.usefixtures("ray_session")


@pytest.fixture(scope="module")
def pool(redis_url: str) -> Iterator[AgentPool]:
    config = PoolConfig(
        name=f"c{uuid.uuid4().hex[:8]}",
        key_prefix=f"t{uuid.uuid4().hex[:8]}",
        redis_url=redis_url,
        tool_modules=["tests.toolkit"],
        simulator=SimulatorConfig(latency_ms=2, latency_sigma=0),
        num_workers=1,
        worker_concurrency=8,
        tenants={
            "cached": TenantPolicy(cache=CacheMode.EXACT, cache_ttl_s=600),
            "narrow": TenantPolicy(allowed_models=["claude-haiku-4-5"]),
            "acme": TenantPolicy(),
        },
    )
    with AgentPool.start(config) as p:
        yield p


def provider_calls(pool: AgentPool) -> int:
    stats = pool.simulator_stats()
    assert stats is not None
    return int(stats["requests"])


def test_a_repeated_deterministic_task_is_answered_from_the_cache(pool: AgentPool) -> None:
    word = uuid.uuid4().hex[:8]
    prompt = f'sim: tool shout {{"text": "{word}"}}\nsim: answer {word}'

    def task(tenant: str = "cached", **kw: object) -> AgentTask:
        return AgentTask(tenant=tenant, prompt=prompt, tools=["shout"], **kw)  # type: ignore[arg-type]

    before = provider_calls(pool)
    [first] = pool.run([task()])
    assert first.ok and first.usage.cached_responses == 0 and first.usage.cost_usd > 0
    assert provider_calls(pool) == before + 2  # the tool request, then the answer
    [again] = pool.run([task()])
    assert again.ok and again.answer == first.answer == word
    # Both turns came from the cache: no provider call, nothing spent, the saving recorded;
    # the tool itself ran again (tools are never cached).
    assert provider_calls(pool) == before + 2
    assert again.usage.cached_responses == 2 and again.usage.cost_usd == 0
    assert again.usage.saved_usd == pytest.approx(first.usage.cost_usd)
    assert [c.ok for c in again.tool_calls] == [True]
    calls = [e.data for e in pool.events(again.task_id, follow=False) if e.event == "llm_call"]
    assert [c["cached"] for c in calls] == [True, True] and {c["cost_usd"] for c in calls} == {0}
    # Another tenant never reads this tenant's cache; a task may opt in on its own.
    [other] = pool.run([task("someone-else", cache=CacheMode.EXACT)])
    assert other.ok and other.usage.cached_responses == 0
    assert provider_calls(pool) == before + 4
    # A task may opt out.
    [fresh] = pool.run([task(cache=CacheMode.OFF)])
    assert fresh.ok and fresh.usage.cached_responses == 0
    today = pool.status()["budgets_today"]["cached"]
    assert today["cache_hits"] >= 2 and today["cache_misses"] >= 2
    assert today["cache_saved_usd"] == pytest.approx(first.usage.cost_usd, rel=1e-6)


def test_truncated_and_failed_calls_are_never_kept(pool: AgentPool) -> None:
    word = uuid.uuid4().hex[:8]
    truncated = AgentTask(tenant="cached", prompt=f"{word}\nsim: output_tokens 500", max_tokens=50)
    failing = AgentTask(tenant="cached", prompt=f"{word}\nsim: fail 400 always")
    first = pool.run([truncated, failing])
    assert first[0].stop_reason == "max_tokens" and first[1].status == "failed"
    before = provider_calls(pool)
    again = pool.run(
        [
            truncated.model_copy(update={"task_id": uuid.uuid4().hex}),
            failing.model_copy(update={"task_id": uuid.uuid4().hex}),
        ]
    )
    assert provider_calls(pool) == before + 2
    assert [r.usage.cached_responses for r in again] == [0, 0]


def test_a_dollar_cap_stops_a_task_short_of_it(pool: AgentPool) -> None:
    prompt = "\n".join(['sim: tool shout {"text": "a"}'] * 20) + "\nsim: output_tokens 80"
    [capped] = pool.run(
        [AgentTask(tenant="acme", prompt=prompt, tools=["shout"], max_iterations=30, max_cost_usd=0.05)]
    )
    assert capped.status == "budget_exhausted" and capped.error.reason == "task_cost_cap"
    assert 0 < capped.usage.cost_usd <= 0.05 and capped.iterations >= 2
    assert len(capped.tool_calls) == capped.iterations  # the work done so far is in the record
    [uncapped] = pool.run([AgentTask(tenant="acme", prompt=prompt, tools=["shout"], max_iterations=30)])
    assert uncapped.ok and uncapped.usage.cost_usd > 0.05


def test_a_routed_task_runs_on_the_cheapest_capable_model(pool: AgentPool) -> None:
    cheap, capable = pool.run(
        [
            AgentTask(tenant="acme", model="auto", prompt="sim: answer a"),
            AgentTask(tenant="acme", model="auto", tier=3, prompt="sim: answer b"),
        ]
    )
    assert (cheap.model, capable.model) == ("claude-haiku-4-5", "claude-opus-4-5")
    assert cheap.usage.cost_usd < capable.usage.cost_usd
    [refused] = pool.run([AgentTask(tenant="narrow", model="auto", tier=3, prompt="x")])
    assert refused.status == "rejected" and "routing ladder" in refused.error.message
