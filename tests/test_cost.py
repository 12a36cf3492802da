"""Spending less on a real pool: per-task dollar caps, the response cache (hits answered
without a provider call, scoped to their tenant, counted per tenant; nothing kept from a
truncated or failed call), routing, and the batch lane through the simulator's Message
Batches API."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import anthropic
import pytest
import ray

from agentpool import AgentPool, AgentTask, CacheMode, PoolConfig, SimulatorConfig, TenantPolicy
from agentpool.lanes import BatchLaneConfig
from agentpool.scheduler.admission import Admission
from agentpool.vocabulary import Lane

pytestmark = pytest.mark.usefixtures("ray_session")


@pytest.fixture(scope="module")
def pool(redis_url: str) -> Iterator[AgentPool]:
    config = PoolConfig(
        name=f"c{uuid.uuid4().hex[:8]}",
        key_prefix=f"t{uuid.uuid4().hex[:8]}",
        redis_url=redis_url,
        tool_modules=["tests.toolkit"],
        simulator=SimulatorConfig(latency_ms=2, latency_sigma=0, batch_delay_ms=300),
        batch_lane=BatchLaneConfig(enabled=True, window_s=0.3, poll_s=0.1, realtime_reserve_s=5),
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


def test_batch_lane_tasks_run_their_loops_through_batches_at_half_the_price(pool: AgentPool) -> None:
    before = pool.simulator_stats()
    assert before is not None
    prompts = [f'sim: tool shout {{"text": "{i}"}}\nsim: answer {i}' for i in range(12)]
    batched = pool.run([AgentTask(tenant="acme", prompt=p, tools=["shout"], lane=Lane.BATCH) for p in prompts])
    after = pool.simulator_stats()
    assert after is not None
    assert [r.answer for r in batched] == [str(i) for i in range(12)] and all(r.ok for r in batched)
    # Two rounds of batches (the tool request, then the answer), a few batches in all; no
    # real-time call.
    assert after["batch_requests"] - before["batch_requests"] == 24
    assert after["batches"] - before["batches"] <= 6
    assert after["requests"] == before["requests"]
    calls = [e.data for e in pool.events(batched[0].task_id, follow=False) if e.event == "llm_call"]
    assert [c["lane"] for c in calls] == ["batch", "batch"]
    # The same tasks on the real-time lane cost twice as much.
    realtime = pool.run([AgentTask(tenant="acme", prompt=p, tools=["shout"]) for p in prompts])
    paid = sum(r.usage.cost_usd for r in batched)
    assert paid == pytest.approx(sum(r.usage.cost_usd for r in realtime) / 2, rel=0.02)


def test_a_batch_lane_call_goes_real_time_when_its_batch_cannot_answer(pool: AgentPool) -> None:
    # An errored batch request (the first 529), and a task with no time for the batch lane.
    errored, hurried = pool.run(
        [
            AgentTask(tenant="acme", prompt="sim: fail 529 x1\nsim: answer e", lane=Lane.BATCH),
            AgentTask(tenant="acme", prompt="sim: answer h", lane=Lane.BATCH, timeout_s=4),
        ]
    )
    assert (errored.answer, hurried.answer) == ("e", "h") and errored.ok and hurried.ok
    for record in (errored, hurried):
        kinds = [e.event for e in pool.events(record.task_id, follow=False)]
        assert "lane_fallback" in kinds
    lanes = [e.data["lane"] for e in pool.events(errored.task_id, follow=False) if e.event == "llm_call"]
    assert lanes == ["realtime"]


def test_a_cancelled_batch_lane_task_leaves_its_batch(pool: AgentPool) -> None:
    task = AgentTask(tenant="acme", prompt="sim: delay 20000\nsim: answer never", lane=Lane.BATCH)
    ref = pool.submit([task])[0]
    sdk = anthropic.Anthropic(api_key="k", base_url=pool.provider_url, max_retries=0)
    deadline = time.monotonic() + 20
    while True:  # its batch is at the provider
        batches = [b for b in sdk.messages.batches.list(limit=5) if b.processing_status == "in_progress"]
        if batches:
            break
        assert time.monotonic() < deadline
        time.sleep(0.05)
    pool.cancel(task.task_id)
    record = ray.get(ref, timeout=30)
    assert record.status == "cancelled"
    # Nobody waits for the batch any more: the worker cancelled it at the provider.
    while sdk.messages.batches.retrieve(batches[0].id).cancel_initiated_at is None:
        assert time.monotonic() < deadline + 10
        time.sleep(0.05)
    assert sdk.messages.batches.retrieve(batches[0].id).request_counts.canceled == 1


def test_a_pool_without_a_batch_lane_refuses_batch_tasks() -> None:
    admission = Admission(PoolConfig(), set())
    refusal = admission.check(AgentTask(tenant="t", prompt="p", lane=Lane.BATCH))
    assert refusal is not None and "no batch lane" in refusal.message
    # Without the lane, a far deadline alone keeps a task real-time.
    assert admission.check(AgentTask(tenant="t", prompt="p", deadline_s=86_400)) is None


def test_the_cost_report_shows_spend_by_tenant_model_and_lane_and_the_savings(pool: AgentPool) -> None:
    tenant = f"report-{uuid.uuid4().hex[:6]}"
    word = uuid.uuid4().hex[:8]
    tasks = [
        AgentTask(tenant=tenant, prompt=f"sim: answer {word}", cache=CacheMode.EXACT),
        AgentTask(tenant=tenant, prompt=f"sim: answer {word}", cache=CacheMode.EXACT),  # a cache hit
        AgentTask(tenant=tenant, prompt="sim: answer b", lane=Lane.BATCH, model="claude-haiku-4-5"),
    ]
    first = pool.run(tasks[:1])
    records = first + pool.run(tasks[1:])
    paid = sum(r.usage.cost_usd for r in records)
    deadline = time.monotonic() + 10
    while (report := pool.cost(days=1, tenant=tenant))["calls"] < 2:  # written off the loop's path
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert report["total_usd"] == pytest.approx(paid, rel=1e-6) and report["calls"] == 2
    assert set(report["by_lane"]) == {"realtime", "batch"}
    assert set(report["by_model"]) == {"claude-sonnet-4-5", "claude-haiku-4-5"}
    assert report["saved"]["batch_lane_usd"] == pytest.approx(records[2].usage.cost_usd, rel=1e-6)
    assert report["saved"]["response_cache_usd"] == pytest.approx(records[0].usage.cost_usd, rel=1e-6)
    assert report["cache"] == {"hits": 1, "misses": 1, "hit_rate": 0.5}
    assert report["by_tenant"][tenant]["calls"] == 2
