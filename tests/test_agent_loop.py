"""The agent loop's stops, retries and fallback: real SDK, simulated provider, no Ray."""

from __future__ import annotations

import re
import time
from typing import Any

import anthropic
import pytest

from agentpool.actors.agent_loop import AgentLoop
from agentpool.actors.backoff import Backoff
from agentpool.actors.llm import LLMClient
from agentpool.actors.tool_runtime import ToolRunner
from agentpool.config import PoolConfig, RetryPolicy
from agentpool.events import Event
from agentpool.models import AgentTask
from agentpool.pricing import PriceTable
from agentpool.protocol import ToolCall, ToolOutcome
from agentpool.simulator import SimulatorServer
from agentpool.tools import load_tools

TOOLS = load_tools(["agentpool.builtin_tools", "tests.toolkit"])


class Harness:
    """Wires one AgentLoop to the simulator; records events and the delays it would sleep."""

    def __init__(self, sim: SimulatorServer, retry: RetryPolicy | None = None) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.sleeps: list[float] = []
        sdk = anthropic.AsyncAnthropic(api_key="k", base_url=sim.url, max_retries=0)
        self.llm = LLMClient(
            sdk, Backoff(retry or RetryPolicy(base_delay_s=0.5)), clock=time.monotonic, sleep=self._sleep
        )
        self.runner = ToolRunner(TOOLS, output_max_chars=1000)

    async def _sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)

    async def emit(self, event: Event) -> None:
        self.events.append((event.TYPE, event.data()))

    async def run_tool(self, call: ToolCall) -> ToolOutcome:
        return await self.runner.execute(call)

    async def run(self, **task: Any) -> Any:
        task.setdefault("tenant", "acme")
        t = AgentTask(**task)
        config = PoolConfig()
        loop = AgentLoop(
            t,
            call_llm=self.llm.create,
            run_tool=self.run_tool,
            tool_defs=[TOOLS[name].definition() for name in t.tools],
            models=config.model_chain(t.model, t.fallback_models),
            prices=PriceTable(),
            emit=self.emit,
            trace_id="trace",
        )
        return await loop.run()

    def named(self, event: str) -> list[dict[str, Any]]:
        return [fields for name, fields in self.events if name == event]


async def test_succeeds_with_tool_and_prices_usage(sim: SimulatorServer) -> None:
    h = Harness(sim)
    r = await h.run(prompt="What is 1234*5678?", tools=["calculator"])
    assert r.status == "succeeded" and "7006652" in r.answer
    assert r.iterations == 2 and r.llm_attempts == 2
    assert [c.name for c in r.tool_calls] == ["calculator"] and r.tool_calls[0].ok
    assert r.usage.cache_creation_input_tokens > 0 and r.usage.cache_read_input_tokens > 0
    assert r.usage.cost_usd == PriceTable().priced("claude-sonnet-4-5", r.usage).cost_usd > 0
    assert [e for e, _ in h.events] == ["llm_call", "tool_call", "tool_result", "llm_call"]


async def test_iteration_cap_keeps_work_done(sim: SimulatorServer) -> None:
    h = Harness(sim)
    prompt = "\n".join(['sim: tool shout {"text": "a"}'] * 5)
    r = await h.run(prompt=prompt, tools=["shout"], max_iterations=3)
    assert r.status == "iteration_cap" and r.iterations == 3
    assert len(r.tool_calls) == 3 and r.usage.output_tokens > 0
    assert r.error.type == "IterationCap"


async def test_token_budget_stops_the_loop(sim: SimulatorServer) -> None:
    h = Harness(sim)
    prompt = "\n".join(['sim: tool shout {"text": "a"}'] * 10) + "\nsim: output_tokens 40"
    r = await h.run(prompt=prompt, tools=["shout"], token_budget=300)
    assert r.status == "budget_exhausted"
    assert r.usage.total_tokens >= 300 and r.iterations >= 1
    # the overshoot is bounded by one call: the budget was checked before each request
    assert r.usage.total_tokens < 300 + 200


@pytest.mark.parametrize("cap", [0.0005, 0.003, 0.006, 0.02, 0.2])
async def test_a_dollar_cap_is_never_crossed(sim: SimulatorServer, cap: float) -> None:
    """Each call's worst case is checked before it is sent: the task stops short of its cap
    (with the work done so far) instead of crossing it, whatever the cap."""
    h = Harness(sim)
    prompt = "\n".join(['sim: tool shout {"text": "a"}'] * 12) + "\nsim: output_tokens 60"
    r = await h.run(prompt=prompt, tools=["shout"], max_tokens=200, max_iterations=20, max_cost_usd=cap)
    assert r.usage.cost_usd <= cap
    assert r.usage.cost_usd == pytest.approx(sum(c["cost_usd"] for c in h.named("llm_call")))
    if cap == 0.2:
        assert r.status == "succeeded" and r.iterations == 13
        return
    assert r.status == "budget_exhausted" and r.error.reason == "task_cost_cap" and r.error.type == "CostCapReached"
    assert len(r.tool_calls) == r.iterations  # the work done so far is in the record
    # It stopped only because the next call's worst case did not fit.
    worst = float(re.search(r"could cost up to \$([0-9.]+)", r.error.message).group(1))
    assert r.usage.cost_usd + worst > cap
    assert worst >= PriceTable().worst_cost_usd(["claude-sonnet-4-5"], 1, 200)
    if cap < PriceTable().worst_cost_usd(["claude-sonnet-4-5"], 1, 200):
        assert r.iterations == 0  # not even one call fits
    else:
        assert r.iterations >= 1


async def test_timeout_returns_partial_work(sim: SimulatorServer) -> None:
    h = Harness(sim)
    prompt = 'sim: tool shout {"text": "a"}\nsim: tool shout {"text": "b"}\nsim: delay 150'
    r = await h.run(prompt=prompt, tools=["shout"], timeout_s=0.4)
    assert r.status == "timed_out" and r.error.type == "Timeout"
    assert r.iterations >= 1 and r.usage.input_tokens > 0


async def test_non_retryable_400_fails_at_once(sim: SimulatorServer) -> None:
    h = Harness(sim)
    r = await h.run(prompt="sim: fail 400 always")
    assert r.status == "failed" and r.error.type == "ProviderError" and not r.error.retryable
    assert r.llm_attempts == 1 and h.sleeps == []


@pytest.mark.parametrize("status", [401, 403, 413])
async def test_auth_and_size_errors_are_never_retried(sim: SimulatorServer, status: int) -> None:
    h = Harness(sim)
    r = await h.run(prompt=f"sim: fail {status} always")
    assert r.status == "failed" and r.llm_attempts == 1 and h.named("retry") == []


@pytest.mark.parametrize("status", [429, 500, 529])
async def test_transient_errors_are_retried_honouring_retry_after(sim: SimulatorServer, status: int) -> None:
    h = Harness(sim, RetryPolicy(base_delay_s=0.1, max_delay_s=0.2))
    r = await h.run(prompt=f"sim: fail {status} x2\nsim: answer fine")
    assert r.status == "succeeded" and r.answer == "fine"
    assert r.llm_attempts == 3 and len(h.named("retry")) == 2
    # the simulator sends retry-after: 1, longer than our own backoff would wait
    assert h.sleeps == [1.0, 1.0]


async def test_fallback_to_next_model_after_attempts_run_out(sim: SimulatorServer) -> None:
    h = Harness(sim, RetryPolicy(max_attempts_per_model=2))
    r = await h.run(
        prompt="sim: fail 529 always model=claude-sonnet-4-5\nsim: answer from backup",
        model="claude-sonnet-4-5",
        fallback_models=["claude-haiku-4-5"],
    )
    assert r.status == "succeeded" and r.model == "claude-haiku-4-5" and r.answer == "from backup"
    assert r.llm_attempts == 3
    assert h.named("fallback") == [
        {"from_model": "claude-sonnet-4-5", "to_model": "claude-haiku-4-5", "reason": h.named("fallback")[0]["reason"]}
    ]


async def test_model_not_found_falls_back_without_retrying(sim: SimulatorServer) -> None:
    h = Harness(sim)
    r = await h.run(
        prompt="sim: fail 404 always model=claude-gone\nsim: answer ok",
        model="claude-gone",
        fallback_models=["claude-haiku-4-5"],
    )
    assert r.status == "succeeded" and r.model == "claude-haiku-4-5" and r.llm_attempts == 2


async def test_every_model_failing_is_a_retryable_failure(sim: SimulatorServer) -> None:
    h = Harness(sim, RetryPolicy(max_attempts_per_model=2))
    r = await h.run(prompt="sim: fail 529 always", fallback_models=["claude-haiku-4-5"])
    assert r.status == "failed" and r.error.retryable and r.llm_attempts == 4


SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "population": {"type": "integer"}},
    "required": ["city", "population"],
}


async def test_structured_output_is_validated(sim: SimulatorServer) -> None:
    h = Harness(sim)
    r = await h.run(prompt='sim: answer {"city": "Paris", "population": 2100000}', output_schema=SCHEMA)
    assert r.status == "succeeded" and r.answer == {"city": "Paris", "population": 2100000}


async def test_structured_output_errors_are_fed_back(sim: SimulatorServer) -> None:
    h = Harness(sim)
    r = await h.run(prompt='sim: answer {"city": "Paris"}', output_schema=SCHEMA)
    # The correction request is now the latest user text, so the simulator's directives no
    # longer apply and its heuristic answers with an instance of the schema.
    assert r.status == "succeeded" and set(r.answer) == {"city", "population"}
    assert len(h.named("output_invalid")) == 1 and "population" in h.named("output_invalid")[0]["problem"]


async def test_the_system_prompt_and_the_schema_instruction_stay_apart(sim: SimulatorServer) -> None:
    # A system prompt's last line (here a simulator directive, as an agent's spec may carry)
    # is not run together with the instruction that follows it.
    verdict = {"type": "object", "properties": {"pass": {"type": "boolean"}}, "required": ["pass"]}
    r = await Harness(sim).run(prompt="The answer is 42.", system="sim: judge 42", output_schema=verdict)
    assert r.answer == {"pass": True, "score": 1.0, "reason": "scripted judge"}


async def test_structured_output_that_never_validates_hits_the_cap(sim: SimulatorServer) -> None:
    h = Harness(sim)
    r = await h.run(prompt="sim: answer not json", output_schema=SCHEMA, max_iterations=1)
    assert r.status == "iteration_cap" and r.answer == "not json"


async def test_tool_errors_go_back_to_the_model(sim: SimulatorServer) -> None:
    h = Harness(sim)
    prompt = (
        'sim: tool explode {}\nsim: tool calculator {"expr": 1}\nsim: tool stall_async {}\n'
        "sim: tool nosuch {}\nsim: answer survived"
    )
    r = await h.run(prompt=prompt, tools=["explode", "calculator", "stall_async"])
    assert r.status == "succeeded" and r.answer == "survived"
    assert [(c.name, c.error_kind) for c in r.tool_calls] == [
        ("explode", "error"),
        ("calculator", "invalid_arguments"),
        ("stall_async", "timeout"),
        ("nosuch", "unknown_tool"),
    ]
