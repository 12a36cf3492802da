"""Cost-aware routing (`model="auto"`): the route up the ladder (pure, hypothesis), and a
routed task escalating through the real agent loop and the simulated provider, on a failed
model, an answer that breaks the output schema, or the routing's escalation phrase."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agentpool.config import PoolConfig
from agentpool.models import AgentTask, TenantPolicy
from agentpool.pricing import PriceTable
from agentpool.routing import RoutedModel, Routing, route
from agentpool.simulator import SimulatorServer
from agentpool.simulator.script import UNABLE
from tests.test_agent_loop import Harness

NAMES = [f"m{i}" for i in range(8)]
ladders = st.lists(
    st.builds(RoutedModel, model=st.sampled_from(NAMES), tier=st.integers(1, 5)),
    min_size=1,
    max_size=8,
    unique_by=lambda m: m.model,
)


@given(ladders, st.integers(1, 6), st.none() | st.sets(st.sampled_from(NAMES)), st.data())
def test_the_route_starts_at_the_cheapest_capable_model_and_only_goes_up(
    ladder: list[RoutedModel], need: int, allowed: set[str] | None, data: st.DataObject
) -> None:
    prices = {name: data.draw(st.floats(0, 100)) for name in NAMES}
    chain = route(Routing(ladder=ladder), need, allowed, prices.__getitem__)
    tiers = {m.model: m.tier for m in ladder}
    fit = [m.model for m in ladder if m.tier >= need and (allowed is None or m.model in allowed)]
    assert bool(chain) == bool(fit)
    if not chain:
        return
    assert set(chain) <= set(fit) and len(set(chain)) == len(chain)
    assert prices[chain[0]] == min(prices[m] for m in fit)  # the cheapest capable model first
    assert all(tiers[a] < tiers[b] for a, b in itertools.pairwise(chain))  # then only up
    # Every tier above the first that has a capable model is on the way up, at its cheapest.
    above = {tiers[m] for m in fit if tiers[m] > tiers[chain[0]]}
    assert {tiers[m] for m in chain[1:]} == above
    for model in chain[1:]:
        assert prices[model] == min(prices[m] for m in fit if tiers[m] == tiers[model])


def test_the_default_ladder_routes_by_tier_and_a_tenant_may_narrow_it() -> None:
    config = PoolConfig(tenants={"cheap": TenantPolicy(allowed_models=["claude-haiku-4-5", "claude-sonnet-4-5"])})
    auto = {"model": "auto", "prompt": "p"}
    assert config.task_models(AgentTask(tenant="t", **auto)) == [
        "claude-haiku-4-5",
        "claude-sonnet-4-5",
        "claude-opus-4-5",
    ]
    assert config.task_models(AgentTask(tenant="t", tier=2, **auto)) == ["claude-sonnet-4-5", "claude-opus-4-5"]
    assert config.task_models(AgentTask(tenant="cheap", tier=3, **auto)) == []  # refused at admission
    assert config.routing_for(AgentTask(tenant="t", prompt="p")) is None
    assert PriceTable().price("claude-haiku-4-5") is not None


async def _routed(h: Harness, routing: Routing | None = None, **task: Any) -> Any:
    from agentpool.actors.agent_loop import AgentLoop

    config = PoolConfig(routing=routing or Routing())
    t = AgentTask(tenant="acme", model="auto", **task)
    loop = AgentLoop(
        t,
        call_llm=h.llm.create,
        run_tool=h.run_tool,
        tool_defs=[],
        models=config.task_models(t),
        prices=PriceTable(),
        emit=h.emit,
        routing=config.routing_for(t),
    )
    return await loop.run()


async def test_a_routed_task_starts_cheap_and_stays_there_when_it_can(sim: SimulatorServer) -> None:
    h = Harness(sim)
    r = await _routed(h, prompt="sim: answer 42")
    assert r.ok and r.model == "claude-haiku-4-5" and r.escalations == 0 and not h.named("model_escalated")


async def test_the_escalation_phrase_moves_a_task_up_until_a_model_can(sim: SimulatorServer) -> None:
    h = Harness(sim)
    phrase = Routing(escalate_when_answer_contains="cannot do this task")
    r = await _routed(h, phrase, prompt="sim: unable claude-haiku,claude-sonnet\nsim: answer done")
    assert r.ok and r.answer == "done" and r.model == "claude-opus-4-5" and r.escalations == 2
    assert [(e["from_model"], e["to_model"], e["reason"]) for e in h.named("model_escalated")] == [
        ("claude-haiku-4-5", "claude-sonnet-4-5", "signal"),
        ("claude-sonnet-4-5", "claude-opus-4-5", "signal"),
    ]
    # Without the phrase configured, the cheap model's answer stands.
    plain = await _routed(Harness(sim), prompt="sim: unable claude-haiku\nsim: answer done")
    assert plain.ok and plain.answer == UNABLE and plain.escalations == 0


async def test_an_answer_that_breaks_the_schema_moves_the_task_up(sim: SimulatorServer) -> None:
    h = Harness(sim)
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    r = await _routed(h, prompt='sim: unable claude-haiku\nsim: answer {"n": 7}', output_schema=schema)
    assert r.ok and r.answer == {"n": 7} and r.model == "claude-sonnet-4-5" and r.escalations == 1
    assert [e["reason"] for e in h.named("model_escalated")] == ["invalid_output"]
    assert len(h.named("output_invalid")) == 1


async def test_a_failing_model_hands_the_call_up_the_ladder(sim: SimulatorServer) -> None:
    h = Harness(sim)
    r = await _routed(h, prompt="sim: fail 529 always model=claude-haiku-4-5\nsim: answer ok")
    assert r.ok and r.model == "claude-sonnet-4-5" and r.escalations == 1
    assert [e["reason"] for e in h.named("model_escalated")] == ["failure"]
    assert h.named("fallback")  # the provider's failure, as for any fallback


@pytest.mark.parametrize("tier", [1, 2, 3])
async def test_a_task_never_runs_below_its_tier(sim: SimulatorServer, tier: int) -> None:
    r = await _routed(Harness(sim), prompt="sim: answer x", tier=tier)
    assert r.model == ["claude-haiku-4-5", "claude-sonnet-4-5", "claude-opus-4-5"][tier - 1]
