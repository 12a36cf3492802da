"""The Anthropic tool-use loop with hard stops, as plain async Python (no Ray).

One `AgentLoop` runs one task: call the model, run the tools it asks for, feed the results
back, until it answers or a limit stops it. Whatever stops it, the loop's state (usage,
iterations, tool calls, the last text) is kept on the object, so the result always carries
the work done so far and the reason it ended.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable
from typing import Any

from jsonschema import Draft202012Validator

from actors.llm import Emit, LLMResponse
from agentpool.errors import BudgetExceeded, ProviderError
from agentpool.models import AgentResult, AgentTask, ErrorInfo, TaskStatus, ToolCallSummary, Usage
from agentpool.pricing import PriceTable
from agentpool.protocol import ToolCall, ToolOutcome
from agentpool.simulator.script import SCHEMA_MARKER

CallLLM = Callable[[dict[str, Any], list[str], Emit], Awaitable[LLMResponse]]
RunTools = Callable[[list[ToolCall]], Awaitable[list[ToolOutcome]]]
_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)


class AgentLoop:
    """Runs one task's conversation to an `AgentResult` (timings are the caller's to fill)."""

    def __init__(
        self,
        task: AgentTask,
        *,
        call_llm: CallLLM,
        run_tools: RunTools,
        tool_defs: list[dict[str, Any]],
        models: list[str],
        prices: PriceTable,
        emit: Emit,
        trace_id: str = "",
    ) -> None:
        self.task = task
        self._call_llm = call_llm
        self._run_tools = run_tools
        self._tool_defs = tool_defs
        self._models = models
        self._prices = prices
        self._emit = emit
        self.trace_id = trace_id
        self.messages: list[dict[str, Any]] = [{"role": "user", "content": task.prompt}]
        self.usage = Usage()
        self.iterations = 0
        self.attempts = 0
        self.tool_calls: list[ToolCallSummary] = []
        self.last_text: str | None = None
        self.model: str | None = None
        self.stop_reason: str | None = None

    async def run(self) -> AgentResult:
        try:
            async with asyncio.timeout(self.task.timeout_s):
                return await self._run()
        except TimeoutError:
            return self._result(
                "timed_out",
                error=ErrorInfo(
                    type="Timeout", message=f"task exceeded timeout_s={self.task.timeout_s}", retryable=True
                ),
            )
        except BudgetExceeded as exc:  # the tenant's daily budget ran out between two calls
            result = self._result(
                "budget_exhausted",
                error=ErrorInfo(
                    type=exc.type_name, message=exc.message, retryable=True, reason=exc.fields.get("reason")
                ),
            )
            result.retry_after_s = exc.fields.get("retry_after_s")
            return result
        except ProviderError as exc:
            self.attempts += int(exc.fields.get("attempts") or 0)
            return self._result(
                "failed", error=ErrorInfo(type="ProviderError", message=exc.message, retryable=exc.retryable)
            )

    # --- the loop --------------------------------------------------------------------

    async def _run(self) -> AgentResult:
        validator = Draft202012Validator(self.task.output_schema) if self.task.output_schema else None
        for iteration in range(1, self.task.max_iterations + 1):
            max_tokens = self.task.max_tokens
            if self.task.token_budget is not None:
                remaining = self.task.token_budget - self.usage.total_tokens
                if remaining <= 0:
                    return self._budget_exhausted()
                max_tokens = min(max_tokens, remaining)
            response = await self._call_llm(self._request(max_tokens), self._models, self._emit)
            await self._emit("llm_call", **self._record(iteration, response))
            message = response.message
            content = message.get("content", [])
            self.messages.append({"role": "assistant", "content": content})
            if self.stop_reason == "tool_use":
                if self._over_budget():
                    return self._budget_exhausted()
                await self._tools_turn(iteration, content)
                continue
            if self.stop_reason == "refusal":
                return self._result("failed", error=ErrorInfo(type="Refusal", message="the model refused"))
            if validator is None:
                return self._result("succeeded", answer=self.last_text or "")
            answer, problem = _parse_structured(self.last_text or "", validator)
            if problem is None:
                return self._result("succeeded", answer=answer)
            # Tell the model what was wrong so that the next turn can fix it.
            self.messages.append(
                {
                    "role": "user",
                    "content": (
                        f"Your answer did not match the required JSON Schema: {problem}. "
                        "Reply again with only the corrected JSON value."
                    ),
                }
            )
            await self._emit("output_invalid", iteration=iteration, problem=problem[:500])
        return self._result(
            "iteration_cap",
            error=ErrorInfo(
                type="IterationCap", message=f"no final answer within max_iterations={self.task.max_iterations}"
            ),
        )

    def _request(self, max_tokens: int) -> dict[str, Any]:
        request: dict[str, Any] = {"max_tokens": max_tokens, "messages": self.messages}
        system = self.task.system or ""
        if self.task.output_schema is not None:
            schema = json.dumps(self.task.output_schema, separators=(",", ":"))
            system += (
                f"\n\nRespond with a single JSON value that {SCHEMA_MARKER}, and nothing else:\n{schema}"
            ).lstrip()
        if system:
            # The system prompt and the tool list are the stable prefix of every turn:
            # marking their ends lets the provider serve them from its prompt cache.
            request["system"] = [{"type": "text", "text": system, "cache_control": {"type": "ephemeral"}}]
        if self._tool_defs:
            tools = [dict(t) for t in self._tool_defs]
            tools[-1]["cache_control"] = {"type": "ephemeral"}
            request["tools"] = tools
        return request

    def _record(self, iteration: int, response: LLMResponse) -> dict[str, Any]:
        """Folds one response into the loop's state; returns the `llm_call` event fields."""
        message = response.message
        usage = self._prices.priced(response.model, Usage.from_api(message.get("usage")))
        self.usage = self.usage + usage
        self.iterations = iteration
        self.attempts += response.attempts
        # After a fallback, stay on the model that works for the rest of the task.
        self._models = self._models[self._models.index(response.model) :]
        self.model = response.model
        self.stop_reason = message.get("stop_reason")
        text = "".join(b.get("text", "") for b in message.get("content", []) if b.get("type") == "text")
        if text:
            self.last_text = text
        return {
            "iteration": iteration,
            "model": response.model,
            "stop_reason": self.stop_reason,
            "input_tokens": usage.input_tokens,
            "output_tokens": usage.output_tokens,
            "cache_read_input_tokens": usage.cache_read_input_tokens,
            "cache_creation_input_tokens": usage.cache_creation_input_tokens,
            "cost_usd": usage.cost_usd,
            "latency_ms": round(response.latency_ms, 2),
            "attempts": response.attempts,
        }

    async def _tools_turn(self, iteration: int, content: list[dict[str, Any]]) -> None:
        calls = [
            ToolCall(
                task_id=self.task.task_id,
                tenant=self.task.tenant,
                tool_use_id=b["id"],
                name=b["name"],
                arguments=b.get("input"),
                trace_id=self.trace_id,
            )
            for b in content
            if b.get("type") == "tool_use"
        ]
        for call in calls:
            await self._emit("tool_call", iteration=iteration, tool=call.name, tool_use_id=call.tool_use_id)
        outcomes = await self._run_tools(calls)
        for outcome in outcomes:
            self.tool_calls.append(
                ToolCallSummary(
                    tool_use_id=outcome.tool_use_id,
                    name=outcome.name,
                    ok=not outcome.is_error,
                    error_kind=outcome.error_kind,
                    duration_ms=round(outcome.duration_ms, 2),
                    iteration=iteration,
                )
            )
            await self._emit(
                "tool_result",
                iteration=iteration,
                tool=outcome.name,
                tool_use_id=outcome.tool_use_id,
                ok=not outcome.is_error,
                error_kind=outcome.error_kind,
                duration_ms=round(outcome.duration_ms, 2),
            )
        self.messages.append({"role": "user", "content": [o.as_block() for o in outcomes]})

    def _over_budget(self) -> bool:
        budget = self.task.token_budget
        return budget is not None and self.usage.total_tokens >= budget

    def _budget_exhausted(self) -> AgentResult:
        return self._result(
            "budget_exhausted",
            error=ErrorInfo(
                type="TokenBudgetExhausted",
                message=f"used {self.usage.total_tokens} of token_budget={self.task.token_budget}",
            ),
        )

    def _result(self, status: TaskStatus, *, answer: Any = None, error: ErrorInfo | None = None) -> AgentResult:
        return AgentResult(
            task_id=self.task.task_id,
            tenant=self.task.tenant,
            status=status,
            answer=answer if status == "succeeded" else self.last_text,
            error=error,
            usage=self.usage,
            iterations=self.iterations,
            tool_calls=self.tool_calls,
            llm_attempts=self.attempts,
            trace_id=self.trace_id,
            model=self.model,
            stop_reason=self.stop_reason,
        )


def _parse_structured(text: str, validator: Draft202012Validator) -> tuple[Any, str | None]:
    stripped = text.strip()
    fenced = _FENCE.match(stripped)
    if fenced:
        stripped = fenced.group(1)
    try:
        value = json.loads(stripped)
    except json.JSONDecodeError as exc:
        return None, f"not valid JSON ({exc.msg} at position {exc.pos})"
    errors = sorted(validator.iter_errors(value), key=lambda e: list(e.path))
    if errors:
        first = errors[0]
        where = "/".join(str(p) for p in first.path) or "(root)"
        return None, f"at {where}: {first.message}"[:1000]
    return value, None
