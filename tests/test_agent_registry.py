"""The agent registry in a real Redis: a version is written once, a label names one version
for ever, concurrent registrations of one spec make one version, and rollouts, their
figures and eval reports come back as they were saved."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from agentpool.agents import AgentSpec
from agentpool.cluster.agents import AgentRegistry
from agentpool.cluster.keys import Keys
from agentpool.errors import AgentConflict
from agentpool.evals import EvalReport, case_report
from agentpool.models import AgentResult
from agentpool.rollouts import Rollout, RolloutState, Side
from agentpool.vocabulary import RolloutPhase, TaskStatus


@pytest.fixture
async def registry(redis_url: str, key_prefix: str) -> AgentRegistry:
    return AgentRegistry(aioredis.Redis.from_url(redis_url, decode_responses=True), Keys(key_prefix))


async def test_versions_are_labelled_in_order_and_written_once(registry: AgentRegistry) -> None:
    one, created = await registry.register("support", AgentSpec(system="a"))
    assert created and one.label == "v1"
    two, _ = await registry.register("support", AgentSpec(system="b"))
    again, created = await registry.register("support", AgentSpec(system="a"))
    assert two.label == "v2" and again == one and not created
    named, _ = await registry.register("support", AgentSpec(system="c"), label="canary-7")
    assert named.ref == "support@canary-7"
    with pytest.raises(AgentConflict):
        await registry.register("support", AgentSpec(system="d"), label="v1")
    with pytest.raises(AgentConflict):
        await registry.register("support", AgentSpec(system="a"), label="other")
    catalog = await registry.catalog()
    assert catalog.find("support") == one  # the first stays current
    await registry.register("support", AgentSpec(system="b"), current=True)
    assert (await registry.catalog()).find("support") == two
    assert [v.label for v in (await registry.catalog()).history("support")] == ["v1", "v2", "canary-7"]


async def test_concurrent_registrations_make_one_version_each(registry: AgentRegistry) -> None:
    specs = [AgentSpec(system=f"spec {i % 5}") for i in range(40)]
    done = await asyncio.gather(*(registry.register("busy", s) for s in specs))
    assert sum(created for _, created in done) == 5
    catalog = await registry.catalog()
    assert sorted(catalog.labels["busy"]) == ["v1", "v2", "v3", "v4", "v5"]
    assert len({v.sha for v, _ in done}) == 5


async def test_rollouts_and_reports_come_back(registry: AgentRegistry) -> None:
    state = RolloutState.begin(Rollout(agent="support", stable="v1", canary="v2"), "v1+a", "v2+b", 10.0)
    side = Side()
    side.observe(AgentResult(task_id="t", tenant="a", status=TaskStatus.FAILED))
    await registry.save_rollout("pool", state, {"stable": Side(), "candidate": side})
    moved = state.end(RolloutPhase.ROLLED_BACK, 11.0, "by hand")
    await registry.post_transition("pool", "support", moved)
    [(back, sides)] = (await registry.rollouts("pool")).values()
    assert back.candidate_tag == "v2+b" and back.phase is RolloutPhase.CANARY  # saved before it ended
    assert sides["candidate"].failures == 1
    [entry] = await registry.transitions("pool")
    assert (entry["agent"], entry["phase"], entry["reason"]) == ("support", "rolled_back", "by hand")
    report = EvalReport.of(
        "suite",
        "support",
        "v1+a",
        1,
        0.0,
        [case_report("c", [({"status": 1.0}, AgentResult(task_id="t", tenant="a", status=TaskStatus.SUCCEEDED))])],
    )
    await registry.save_report(report)
    assert await registry.report("suite", "v1+a") == report
    assert await registry.report("suite", "v9") is None
