"""Checkpoint and resume of the agent loop (real SDK, simulated provider, no Ray): whatever
step a run dies at, right after a checkpoint is written, a new run from that checkpoint ends
with the same result, and across both runs no LLM turn is sent twice and no tool call runs
twice. Hypothesis picks the task's shape and the step the process dies at."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from typing import Any

import anthropic
from hypothesis import given, settings
from hypothesis import strategies as st

from agentpool.actors.agent_loop import AgentLoop
from agentpool.actors.backoff import Backoff
from agentpool.actors.checkpoint import LoopState
from agentpool.actors.llm import LLMClient
from agentpool.actors.tool_runtime import ToolRunner
from agentpool.config import PoolConfig, RetryPolicy
from agentpool.events import Event
from agentpool.models import AgentResult, AgentTask
from agentpool.pricing import PriceTable
from agentpool.protocol import ToolCall, ToolOutcome
from agentpool.simulator import SimulatorConfig, SimulatorServer
from agentpool.tools import load_tools

TOOLS = load_tools(["agentpool.builtin_tools", "tests.toolkit"])


class _Died(Exception):
    """The process running the loop died (right after a checkpoint reached Redis)."""


class Run:
    def __init__(self, sim: SimulatorServer) -> None:
        sdk = anthropic.AsyncAnthropic(api_key="k", base_url=sim.url, max_retries=0)
        self.llm = LLMClient(sdk, Backoff(RetryPolicy()), clock=lambda: 0.0)
        self.runner = ToolRunner(TOOLS, output_max_chars=1000)
        self.executed: Counter[str] = Counter()
        self.llm_calls = 0
        self.saved: list[str] = []

    async def call_llm(self, request: dict[str, Any], models: list[str], emit: Any) -> Any:
        self.llm_calls += 1
        return await self.llm.create(request, models, emit)

    async def run_tool(self, call: ToolCall) -> ToolOutcome:
        self.executed[call.tool_use_id] += 1
        return await self.runner.execute(call)

    async def emit(self, event: Event) -> None:
        pass

    async def once(self, task: AgentTask, state: LoopState | None, die_at: int | None) -> AgentResult:
        def checkpoint(s: LoopState) -> None:
            self.saved.append(s.model_dump_json())
            if die_at is not None and len(self.saved) == die_at:
                raise _Died

        loop = AgentLoop(
            task,
            call_llm=self.call_llm,
            run_tool=self.run_tool,
            tool_defs=[TOOLS[n].definition() for n in task.tools],
            models=PoolConfig().model_chain(task.model, task.fallback_models),
            prices=PriceTable(),
            emit=self.emit,
            state=state,
            checkpoint=checkpoint,
        )
        result = await loop.run()
        assert isinstance(result, AgentResult)
        return result


def _task(calls: int) -> AgentTask:
    """One tool call per turn (the simulator plays one directive per turn), then an answer."""
    lines = [f'sim: tool calculator {{"expression": "{turn}*10+1"}}' for turn in range(calls)]
    lines.append("sim: answer finished")
    return AgentTask(tenant="acme", prompt="\n".join(lines), tools=["calculator"])


@settings(max_examples=25, deadline=None)
@given(calls=st.integers(1, 5), die_fraction=st.floats(0, 1))
def test_a_run_that_dies_after_any_checkpoint_resumes_without_repeating_work(
    sim_server: SimulatorServer, calls: int, die_fraction: float
) -> None:
    sim_server.sim.configure(SimulatorConfig(latency_ms=1, latency_sigma=0))
    task = _task(calls)
    clean = Run(sim_server)
    expected = asyncio.run(clean.once(task, None, None))
    assert expected.status == "succeeded" and clean.saved
    die_at = 1 + int(die_fraction * (len(clean.saved) - 1))

    crashed = Run(sim_server)
    try:
        asyncio.run(crashed.once(task, None, die_at))
        raise AssertionError("the run should have died")
    except _Died:
        pass
    state = LoopState.model_validate_json(crashed.saved[-1])
    resumed = asyncio.run(crashed.once(task, state, None))

    assert resumed.status == expected.status and resumed.answer == expected.answer
    assert resumed.iterations == expected.iterations
    assert resumed.usage.output_tokens == expected.usage.output_tokens
    assert crashed.llm_calls == clean.llm_calls  # no turn sent twice
    assert set(crashed.executed.values()) == {1} and len(crashed.executed) == calls
    assert resumed.resumes == 1 and resumed.llm_calls_saved == state.iterations
    assert json.loads(crashed.saved[-1])["outcomes"] == {}  # the last save closed the last tool turn
