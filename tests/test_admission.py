"""Admission control through the public API: real Ray, real Redis, the simulator enforcing
the same limits server-side as the pool does client-side."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator

import pytest
import ray
import redis
from typer.testing import CliRunner

from agentpool import AgentPool, AgentTask, PoolConfig, RateLimit, SimulatorConfig, TenantPolicy
from agentpool.cli import app
from agentpool.config import AdmissionConfig

pytestmark = pytest.mark.usefixtures("ray_session")

#: Output tokens bind: with max_tokens=1000 reserved per call, at most 6 calls fit at once.
OTPM = 6000
SIM_LIMITS = {"rpm": 50_000, "itpm": 2_000_000, "otpm": OTPM}


@pytest.fixture(scope="module")
def pool(redis_url: str) -> Iterator[AgentPool]:
    config = PoolConfig(
        name=f"adm{uuid.uuid4().hex[:8]}",
        key_prefix=f"t{uuid.uuid4().hex[:8]}",
        redis_url=redis_url,
        simulator=SimulatorConfig(latency_ms=5, latency_sigma=0.2, **SIM_LIMITS),
        fallback_models=[],
        limits={"claude-sonnet-4": RateLimit(**SIM_LIMITS)},
        num_workers=2,
        worker_concurrency=8,
        admission=AdmissionConfig(target_wait_s=0.05, interval_s=0.3, escalate_intervals=2),
        tenants={
            "budgeted": TenantPolicy(daily_token_budget=1500),
            "capped": TenantPolicy(limits=RateLimit(otpm=2000)),
        },
    )
    p = AgentPool.start(config)
    yield p
    status = p.status()
    assert status["queued"] == 0 and status["in_flight"] == 0, status
    assert status["limits"]["outstanding"] == 0 and status["limits"]["waiting"] == 0, status["limits"]
    p.shutdown()


def test_global_limits_mean_zero_provider_429s(pool: AgentPool) -> None:
    before = pool.simulator_stats()
    tasks = [AgentTask(tenant="acme", prompt=f"sim: answer {i}", max_tokens=1000) for i in range(120)]
    results = pool.run(tasks)
    after = pool.simulator_stats()
    assert {r.status for r in results} == {"succeeded"}
    assert after["rate_limited"] == before["rate_limited"]  # the server never had to say 429
    assert after["requests"] - before["requests"] == 120
    limits = pool.status()["limits"]
    assert limits["stats"]["granted"] >= 120 and limits["outstanding"] == 0
    out = limits["models"]["claude-sonnet-4"]["dimensions"]["output_tokens"]
    assert out["capacity"] == OTPM and out["level"] <= OTPM


def test_a_429_pauses_the_model_for_every_worker(pool: AgentPool) -> None:
    paused_before = pool.status()["limits"]["stats"]["paused"]
    (r,) = pool.run([AgentTask(tenant="acme", prompt=f"sim: fail 429\nsim: answer after {uuid.uuid4()}")])
    assert r.status == "succeeded" and r.llm_attempts == 2
    assert pool.status()["limits"]["stats"]["paused"] == paused_before + 1


def test_a_tenant_cap_makes_its_calls_wait_in_its_own_queue(pool: AgentPool) -> None:
    # capped: 2000 output tokens per minute, so at most two calls of max_tokens=1000 at once.
    capped = [AgentTask(tenant="capped", prompt="sim: delay 150\nsim: answer c", max_tokens=1000) for _ in range(6)]
    started = time.monotonic()
    refs = pool.submit(capped)
    others = pool.run([AgentTask(tenant="acme", prompt="sim: answer quick", max_tokens=10) for _ in range(4)])
    others_done = time.monotonic() - started
    results = ray.get(refs)
    capped_done = time.monotonic() - started
    assert {r.status for r in results + others} == {"succeeded"}
    assert capped_done >= 3 * 0.15  # three rounds of two calls each, at least
    assert others_done < capped_done  # the capped tenant's queue never held up anyone else


def test_budgets_hold_under_concurrency_and_reject_with_the_reset_time(pool: AgentPool, redis_url: str) -> None:
    padding = "lorem ipsum " * 40  # about 120 input tokens per call
    tasks = [AgentTask(tenant="budgeted", prompt=f"sim: answer b{i}\n{padding}", max_tokens=200) for i in range(40)]
    results = pool.run(tasks)
    spent = sum(r.usage.total_tokens for r in results)
    assert spent <= 1500
    ok = [r for r in results if r.status == "succeeded"]
    stopped = [r for r in results if r.status in ("rejected", "budget_exhausted")]
    assert ok and stopped and len(ok) + len(stopped) == 40
    assert all(r.error.type == "BudgetExceeded" and r.error.reason == "daily_token_budget" for r in stopped)
    assert all(0 < r.retry_after_s <= 86_400 for r in stopped)
    assert "resets at" in stopped[0].error.message
    usage = pool.status()["budgets_today"]["budgeted"]
    assert usage["tokens"] == spent and usage["reserved_tokens"] == 0
    # Once spent, a new task is refused at admission, before anything is queued or sent.
    (late,) = pool.run([AgentTask(tenant="budgeted", prompt="sim: answer late")])
    assert late.status == "rejected" and late.error.type == "BudgetExceeded" and late.attempts == 0


def test_deadlines_and_overload_shed_fast_in_priority_order(pool: AgentPool, redis_url: str) -> None:
    # 16 slots; 80 interactive tasks of 300 ms (they have a deadline) make a standing queue
    # for about 1.5 s.
    flood = [
        AgentTask(tenant="acme", prompt=f"sim: delay 300\nsim: answer f{i}", max_tokens=10, deadline_s=60)
        for i in range(80)
    ]
    flood_refs = pool.submit(flood)
    # A task that may wait 50 ms cannot start in time: refused at once, not run late.
    (hurried,) = pool.run([AgentTask(tenant="acme", prompt="sim: answer h", deadline_s=0.05)])
    assert hurried.status == "rejected" and hurried.error.reason in ("predicted_wait", "queue_timeout")
    for _ in range(200):  # until a standing queue has lasted a whole interval
        if pool.status()["overload_level"] >= 1:
            break
        ray.wait(flood_refs, num_returns=1, timeout=0.05)
    assert pool.status()["overload_level"] >= 1
    probes = [
        AgentTask(tenant="acme", prompt=f"sim: answer {p}", priority=p, max_tokens=10)  # type: ignore[arg-type]
        for p in ("sheddable", "critical")
    ]
    sheddable, critical = pool.run(probes)
    assert sheddable.status == "rejected" and sheddable.error.reason == "overload" and sheddable.retry_after_s > 0
    assert critical.status == "succeeded"
    flood_results = ray.get(flood_refs)
    assert {r.status for r in flood_results} <= {"succeeded", "rejected"}
    shed_events = [
        json.loads(fields["data"])
        for _, fields in redis.Redis.from_url(redis_url, decode_responses=True).xrange(
            f"{pool.config.key_prefix}:{{acme}}:events"
        )
        if fields["event"] == "shed"
    ]
    assert {"overload"} <= {e["reason"] for e in shed_events}
    assert pool.status()["shed_by_reason"]["overload"] >= 1


def test_a_batch_is_queued_whole_and_not_taken_for_an_overload(pool: AgentPool) -> None:
    # 160 tasks of 300 ms with no deadline: 3 s of queue on 16 slots, many times the 0.05 s
    # target over the 0.3 s interval. A batch: none of it is shed, and the detector, which
    # watches interactive work only, sees no overload.
    batch = [AgentTask(tenant="acme", prompt=f"sim: delay 300\nsim: answer b{i}", max_tokens=10) for i in range(160)]
    refs = pool.submit(batch)
    levels = []
    for _ in range(5):
        ray.wait(refs, num_returns=len(refs), timeout=0.1)
        levels.append(pool.status()["overload_level"])
    # Interactive work of another tenant arriving meanwhile is served at its fair share.
    (probe,) = pool.run([AgentTask(tenant="other", prompt="sim: answer p", priority="sheddable", max_tokens=10)])
    assert probe.status == "succeeded"
    pending = refs
    while pending:
        _, pending = ray.wait(pending, num_returns=len(pending), timeout=0.1)
        levels.append(pool.status()["overload_level"])
    assert [r.status for r in ray.get(refs)] == ["succeeded"] * len(batch)
    assert len(levels) >= 10 and set(levels) == {0}, levels


def test_status_command_shows_queues_buckets_and_budgets(pool: AgentPool) -> None:
    out = CliRunner().invoke(app, ["status", "--name", pool.config.name, "--json"])
    assert out.exit_code == 0, out.output
    status = json.loads(out.output)
    assert status["limits"]["models"]["claude-sonnet-4"]["dimensions"]["requests"]["capacity"] == 50_000
    assert "budgeted" in status["budgets_today"]
    table = CliRunner().invoke(app, ["status", "--name", pool.config.name])
    assert table.exit_code == 0 and "global rate limits" in table.output and "output_tokens" in table.output
    missing = CliRunner().invoke(app, ["status", "--name", "no-such-pool"])
    assert missing.exit_code == 1 and "no pool named" in missing.output
