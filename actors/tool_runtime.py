"""Runs one tool call to a `ToolOutcome`, whatever the tool does (no Ray here).

A tool's failure is information for the model, not an exception for the loop: unknown
tools, invalid arguments, exceptions and timeouts all come back as `is_error` outcomes.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

from agentpool.errors import ToolError
from agentpool.protocol import ToolCall, ToolOutcome
from agentpool.tools import ToolSpec


class ToolRunner:
    """Validates, runs and bounds tool calls against a fixed set of tools."""

    def __init__(
        self,
        tools: dict[str, ToolSpec],
        *,
        output_max_chars: int = 20_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.tools = tools
        self.output_max_chars = output_max_chars
        self._clock = clock

    def definitions(self) -> dict[str, dict[str, Any]]:
        return {name: spec.definition() for name, spec in sorted(self.tools.items())}

    async def execute(self, call: ToolCall) -> ToolOutcome:
        started = self._clock()
        try:
            content = await self._run(call)
        except ToolError as exc:
            return self._outcome(call, exc.message, started, kind=exc.fields.get("kind", "error"))
        except TimeoutError:
            spec = self.tools[call.name]
            return self._outcome(call, f"tool {call.name} timed out after {spec.timeout_s}s", started, kind="timeout")
        except Exception as exc:  # a tool's own bug: reported to the model, never raised
            return self._outcome(call, f"{type(exc).__name__}: {exc}", started, kind="error")
        return self._outcome(call, content, started, kind=None)

    async def _run(self, call: ToolCall) -> str:
        spec = self.tools.get(call.name)
        if spec is None:
            raise ToolError(f"unknown tool {call.name!r}", tool=call.name, kind="unknown_tool")
        args = spec.validate_args(call.arguments if call.arguments is not None else {})
        if spec.is_async:
            value = await asyncio.wait_for(spec.fn(**args), spec.timeout_s)
        else:
            # A thread cannot be killed: a sync tool that overruns keeps its thread busy after
            # we give up on it. The call still returns at its timeout.
            value = await asyncio.wait_for(asyncio.to_thread(spec.fn, **args), spec.timeout_s)
        return value if isinstance(value, str) else json.dumps(value, default=str)

    def _outcome(self, call: ToolCall, content: str, started: float, *, kind: str | None) -> ToolOutcome:
        if len(content) > self.output_max_chars:
            dropped = len(content) - self.output_max_chars
            content = content[: self.output_max_chars] + f"\n[truncated {dropped} characters]"
        return ToolOutcome(
            tool_use_id=call.tool_use_id,
            name=call.name,
            content=content,
            is_error=kind is not None,
            error_kind=kind,
            duration_ms=(self._clock() - started) * 1000,
        )
