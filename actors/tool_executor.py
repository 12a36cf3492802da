"""The tool-executor actor: a separate process pool where tools run, apart from the agents."""

from __future__ import annotations

import ray

from actors.tool_runtime import ToolRunner
from agentpool.protocol import ToolCall, ToolOutcome
from agentpool.tools import load_tools


@ray.remote
class ToolExecutor:
    """Loads the configured tool modules and executes calls concurrently."""

    def __init__(self, modules: list[str], output_max_chars: int) -> None:
        self._runner = ToolRunner(load_tools(modules), output_max_chars=output_max_chars)
        self.in_flight = 0

    def definitions(self) -> dict[str, dict[str, object]]:
        return self._runner.definitions()

    async def execute(self, call: ToolCall) -> ToolOutcome:
        self.in_flight += 1
        try:
            return await self._runner.execute(call)
        finally:
            self.in_flight -= 1

    def ping(self) -> int:
        return self.in_flight
