"""The Anthropic tool-use loop with hard stops, as plain async Python (no Ray).

One `AgentLoop` runs one task: call the model, run the tools it asks for, feed the results
back, until it answers or a limit stops it. Whatever stops it, the loop's state (usage,
iterations, tool calls, the last text) is kept on the object, so the result always carries
the work done so far and the reason it ended.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

from jsonschema import Draft202012Validator

from agentpool import events
from agentpool.actors.checkpoint import ApprovalRequest, LoopState
from agentpool.actors.llm import LLMResponse, priced_usage
from agentpool.actors.loop_choices import (
    CostCapReached,
    RoutedModels,
    call_event,
    capped,
    parse_structured,
    shown_arguments,
)
from agentpool.actors.session_task import CallLLM as CallLLM
from agentpool.actors.session_task import Compaction, compact
from agentpool.conversation import with_cache_mark
from agentpool.errors import BudgetExceeded, ProviderError
from agentpool.events import Emit
from agentpool.guardrails import DATA_NOTICE, screen, wrap_tool_output
from agentpool.models import (
    AgentResult,
    AgentTask,
    ErrorInfo,
    Guardrails,
    TaskStatus,
    ToolCallSummary,
    Usage,
    agent_fields,
)
from agentpool.pricing import PriceTable
from agentpool.protocol import SCHEMA_MARKER, ApprovalDecision, Paused, ToolCall, ToolOutcome
from agentpool.routing import Routing
from agentpool.vocabulary import ErrorReason, EscalationReason, ToolErrorKind

RunTool = Callable[[ToolCall], Awaitable[ToolOutcome]]
Checkpoint = Callable[[LoopState], None]


class _ApprovalExpired(Exception):
    pass


class _AwaitingApproval(Exception):
    def __init__(self, request: ApprovalRequest) -> None:
        self.request = request


class AgentLoop(RoutedModels):
    """Runs one task's conversation to an `AgentResult` (timings are the caller's to fill)."""

    def __init__(
        self,
        task: AgentTask,
        *,
        call_llm: CallLLM,
        run_tool: RunTool,
        tool_defs: list[dict[str, Any]],
        models: list[str],
        prices: PriceTable,
        emit: Emit,
        trace_id: str = "",
        state: LoopState | None = None,
        checkpoint: Checkpoint | None = None,
        needs_approval: Callable[[str], bool] = lambda name: False,
        approval: ApprovalDecision | None = None,
        approval_timeout_s: float = 3600.0,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        guardrails: Guardrails | None = None,
        history: list[dict[str, Any]] | None = None,
        session_version: int | None = None,
        compaction: Compaction | None = None,
        chars_per_token: float = 3.0,
        routing: Routing | None = None,
    ) -> None:
        self.task = task
        self._guard = guardrails or Guardrails()
        self._call_llm = call_llm
        if task.max_cost_usd is not None:
            cap, spent = task.max_cost_usd, lambda: self.usage.cost_usd
            self._call_llm = capped(call_llm, cap, spent=spent, prices=prices, chars_per_token=chars_per_token)
        #: The routing rules of a routed task (`model="auto"`): its models are its ladder.
        self._routing = routing
        self._run_tool = run_tool
        self._tool_defs = tool_defs
        self._emit = emit
        self._prices = prices
        self.trace_id = trace_id
        self._checkpoint = checkpoint
        self._needs_approval = needs_approval
        self._approval = approval
        self._approval_timeout_s = approval_timeout_s
        self._clock = clock
        self._wall_clock = wall_clock
        self._inner: asyncio.Future[AgentResult] | None = None
        self._cancel_reason: str | None = None
        self._cancel_why = ErrorReason.CANCELLED
        self._started = clock()
        self._compaction = compaction
        if state is None:
            history = list(history or [])
            state = LoopState(
                messages=[*history, {"role": "user", "content": task.prompt}],
                models=models,
                history=len(history),
                session_version=session_version,
            )
        else:  # resuming: the turns it holds are not sent again
            state = state.model_copy(
                update={"resumes": state.resumes + 1, "llm_calls_saved": state.llm_calls_saved + state.iterations}
            )
        self.state = state
        self.resumed_from = state.iterations if state.resumes else None
        self._models = state.models or models

    # The loop's progress lives in its `LoopState`; these read it.
    @property
    def messages(self) -> list[dict[str, Any]]:
        return self.state.messages

    @property
    def usage(self) -> Usage:
        return self.state.usage

    @property
    def iterations(self) -> int:
        return self.state.iterations

    @property
    def last_text(self) -> str | None:
        return self.state.last_text

    def cancel(self, reason: str = "cancelled", why: ErrorReason = ErrorReason.CANCELLED) -> bool:
        """Stops the run at its next await (or before it starts); it ends with status
        `cancelled` and the work done so far. False if it has already ended."""
        if self._inner is not None and self._inner.done():
            return False
        self._cancel_reason, self._cancel_why = reason, why
        if self._inner is not None:
            self._inner.cancel()
        return True

    async def run(self) -> AgentResult | Paused:
        """Runs to a final result, or to a pause for approval (checkpoint saved first)."""
        remaining = self.task.timeout_s - self.state.elapsed_s
        try:
            if self._cancel_reason is not None:
                raise asyncio.CancelledError
            if remaining <= 0:
                raise TimeoutError
            self._inner = asyncio.ensure_future(self._run())
            async with asyncio.timeout(remaining):
                return await self._inner
        except _AwaitingApproval as pause:
            request = pause.request
            return Paused(
                task_id=self.task.task_id,
                tenant=self.task.tenant,
                tool_use_ids=request.tool_use_ids,
                tools=request.tools,
                arguments=request.arguments,
                requested_unix=request.requested_unix,
                deadline_unix=request.deadline_unix,
            )
        except asyncio.CancelledError:
            if self._cancel_reason is None:
                raise
            return self._result(
                TaskStatus.CANCELLED,
                error=ErrorInfo(type="Cancelled", message=self._cancel_reason, reason=self._cancel_why),
            )
        except TimeoutError:
            return self._result(
                TaskStatus.TIMED_OUT,
                error=ErrorInfo(
                    type="Timeout", message=f"task exceeded timeout_s={self.task.timeout_s}", retryable=True
                ),
            )
        except BudgetExceeded as exc:  # the tenant's daily budget ran out between two calls
            result = self._result(
                TaskStatus.BUDGET_EXHAUSTED,
                error=ErrorInfo(
                    type=exc.type_name, message=exc.message, retryable=True, reason=exc.fields.get("reason")
                ),
            )
            result.retry_after_s = exc.fields.get("retry_after_s")
            return result
        except CostCapReached as cap:
            return self._result(TaskStatus.BUDGET_EXHAUSTED, error=cap.error(self.usage.cost_usd))
        except _ApprovalExpired:
            return self._result(
                TaskStatus.TIMED_OUT,
                error=ErrorInfo(
                    type="ApprovalTimeout",
                    message="no approval came for a tool call before its deadline",
                    reason=ErrorReason.APPROVAL_DEADLINE,
                ),
            )
        except ProviderError as exc:
            self.state.llm_attempts += int(exc.fields.get("attempts") or 0)
            return self._result(
                TaskStatus.FAILED, error=ErrorInfo(type="ProviderError", message=exc.message, retryable=exc.retryable)
            )

    # --- the loop --------------------------------------------------------------------

    async def _run(self) -> AgentResult:
        validator = Draft202012Validator(self.task.output_schema) if self.task.output_schema else None
        if self._compaction is not None and self.state.iterations == 0 and not self.state.compacted:
            await self._compact(self._compaction)
        pending = self.state.pending_tool_uses()
        if pending:  # resumed in the middle of a tool turn
            await self._tools_turn(self.state.iterations, pending)
        for iteration in range(self.state.iterations + 1, self.task.max_iterations + 1):
            max_tokens = self.task.max_tokens
            if self.task.token_budget is not None:
                remaining = self.task.token_budget - self.usage.total_tokens
                if remaining <= 0:
                    return self._budget_exhausted()
                max_tokens = min(max_tokens, remaining)
            asked = self._models[0]
            response = await self._call_llm(self._request(max_tokens), self._models, self._emit)
            await self._emit(self._record(iteration, response))
            if self._routing is not None and response.model != asked:  # its model failed: the next one answered
                await self._escalated(iteration, asked, response.model, EscalationReason.FAILURE)
            message = response.message
            content = message.get("content", [])
            self.messages.append({"role": "assistant", "content": content})
            if self.state.stop_reason != "tool_use" and self._asks_for_stronger():
                await self._escalate(iteration, EscalationReason.SIGNAL)
                continue
            if self.state.stop_reason == "tool_use":
                if self._over_budget():
                    return self._budget_exhausted()
                self._save()
                await self._tools_turn(iteration, [b for b in content if b.get("type") == "tool_use"])
                continue
            if self.state.stop_reason == "refusal":
                return self._result(TaskStatus.FAILED, error=ErrorInfo(type="Refusal", message="the model refused"))
            if validator is None:
                return self._result(TaskStatus.SUCCEEDED, answer=self.last_text or "")
            answer, problem = parse_structured(self.last_text or "", validator)
            if problem is None:
                return self._result(TaskStatus.SUCCEEDED, answer=answer)
            if self._routing is not None and self._routing.escalate_on_invalid_output and len(self._models) > 1:
                await self._emit(events.OutputInvalid(iteration=iteration, problem=problem[:500]))
                await self._escalate(iteration, EscalationReason.INVALID_OUTPUT)
                continue
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
            await self._emit(events.OutputInvalid(iteration=iteration, problem=problem[:500]))
            self._save()
        return self._result(
            TaskStatus.ITERATION_CAP,
            error=ErrorInfo(
                type="IterationCap", message=f"no final answer within max_iterations={self.task.max_iterations}"
            ),
        )

    async def _compact(self, plan: Compaction) -> None:
        """The history's older turns summarised before the first turn (`compact`), saved."""
        await compact(
            self.state,
            plan,
            call_llm=self._call_llm,
            prices=self._prices,
            emit=self._emit,
            session_id=self.task.session_id or "",
        )
        self._save()

    def _request(self, max_tokens: int) -> dict[str, Any]:
        # The history the task started from is the stable prefix of every turn: its end is
        # marked for the provider's prompt cache (after a compaction, the new history's end).
        messages = with_cache_mark(self.messages, self.state.history)
        request: dict[str, Any] = {"max_tokens": max_tokens, "messages": messages}
        system = self.task.system or ""
        if self.task.output_schema is not None:
            schema = json.dumps(self.task.output_schema, separators=(",", ":"))
            system = f"{system}\n\nRespond with a single JSON value that {SCHEMA_MARKER}, and nothing else:\n{schema}"
            system = system.lstrip()
        if self._tool_defs and self._guard.wraps_tool_output:
            system = f"{system}\n\n{DATA_NOTICE}".lstrip()
        if system:
            # The system prompt and the tool list are the stable prefix of every turn:
            # marking their ends lets the provider serve them from its prompt cache.
            request["system"] = [{"type": "text", "text": system, "cache_control": {"type": "ephemeral"}}]
        if self._tool_defs:
            tools = [dict(t) for t in self._tool_defs]
            tools[-1]["cache_control"] = {"type": "ephemeral"}
            request["tools"] = tools
        return request

    def _record(self, iteration: int, response: LLMResponse) -> events.LlmCall:
        """Folds one response into the loop's state; returns its `llm_call` event."""
        message = response.message
        usage = priced_usage(response, self._prices)
        st = self.state
        st.usage = st.usage + usage
        st.iterations = iteration
        st.llm_attempts += response.attempts
        # After a fallback, stay on the model that works for the rest of the task.
        self._models = self._models[self._models.index(response.model) :]
        st.models = self._models
        st.model = response.model
        st.stop_reason = message.get("stop_reason")
        text = "".join(b.get("text", "") for b in message.get("content", []) if b.get("type") == "text")
        if text:
            st.last_text = text
        return call_event(self.task.tenant, iteration, response, usage, st.stop_reason)

    async def _tools_turn(self, iteration: int, blocks: list[dict[str, Any]]) -> None:
        calls = [
            ToolCall(
                task_id=self.task.task_id,
                tenant=self.task.tenant,
                tool_use_id=b["id"],
                name=b["name"],
                arguments=b.get("input"),
                trace_id=self.trace_id,
            )
            for b in blocks
        ]
        done = self.state.outcomes
        todo = [c for c in calls if c.tool_use_id not in done]
        denied = self._gate(todo)
        for call in todo:
            await self._emit(
                events.ToolCallStarted(
                    iteration=iteration,
                    tool=call.name,
                    tool_use_id=call.tool_use_id,
                    arguments=shown_arguments(call.arguments),
                )
            )

        async def one(call: ToolCall) -> None:
            outcome = denied.get(call.tool_use_id) or await self._screened(iteration, await self._run_tool(call))
            done[call.tool_use_id] = outcome
            self._save()  # this outcome is not produced again if the task resumes
            self.state.tool_calls.append(
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
                events.ToolResult(
                    iteration=iteration,
                    tool=outcome.name,
                    tool_use_id=outcome.tool_use_id,
                    ok=not outcome.is_error,
                    error_kind=outcome.error_kind,
                    duration_ms=round(outcome.duration_ms, 2),
                )
            )

        await asyncio.gather(*(one(c) for c in todo))
        self.messages.append({"role": "user", "content": [self._block(done[c.tool_use_id]) for c in calls]})
        self.state.outcomes = {}
        self.state.approval = None
        self._save()

    async def _screened(self, iteration: int, outcome: ToolOutcome) -> ToolOutcome:
        """The tenant's prompt-injection screen over a tool's output: a finding is an
        `injection_detected` event; under "block" the output is withheld from the model."""
        if self._guard.injection == "off":
            return outcome
        rules = screen(outcome.content, tool_output=True)
        if not rules:
            return outcome
        block = self._guard.injection == "block"
        await self._emit(
            events.InjectionDetected(
                source="tool_result",
                iteration=iteration,
                tool=outcome.name,
                tool_use_id=outcome.tool_use_id,
                rules=rules,
                action="withheld" if block else "flagged",
            )
        )
        if not block:
            return outcome
        withheld = f"the output of {outcome.name} was withheld: it looks like a prompt injection ({', '.join(rules)})"
        return outcome.model_copy(update={"content": withheld, "is_error": True, "error_kind": ToolErrorKind.INJECTION})

    def _block(self, outcome: ToolOutcome) -> dict[str, Any]:
        block = outcome.as_block()
        if self._guard.wraps_tool_output:
            block["content"] = wrap_tool_output(outcome.name, outcome.content)
        return block

    def _gate(self, calls: list[ToolCall]) -> dict[str, ToolOutcome]:
        """Holds calls to tools that need a human's approval until one is given. Returns the
        outcomes of denied calls; raises `_AwaitingApproval` while the decision is pending."""
        gated = [c for c in calls if self._needs_approval(c.name)]
        if not gated:
            return {}
        ids = [c.tool_use_id for c in gated]
        decision = self._approval
        if decision is None or not decision.covers(ids):
            now = self._wall_clock()
            request = self.state.approval
            if request is None or set(request.tool_use_ids) != set(ids):
                request = ApprovalRequest(
                    tool_use_ids=ids,
                    tools=[c.name for c in gated],
                    arguments=[c.arguments for c in gated],
                    requested_unix=now,
                    deadline_unix=now + self._approval_timeout_s,
                )
            if now < request.deadline_unix:
                self.state.approval = request
                self._save()
                raise _AwaitingApproval(request)
            decision = ApprovalDecision(tool_use_ids=ids, approved=None, decided_unix=now)
        if decision.approved is None:
            raise _ApprovalExpired
        if decision.approved:
            return {}
        note = f": {decision.note}" if decision.note else ""
        return {
            c.tool_use_id: ToolOutcome.failure(
                c, ToolErrorKind.DENIED, f"a human reviewer did not approve this call{note}"
            )
            for c in gated
        }

    def _save(self) -> None:
        if self._checkpoint is not None:
            now = self._clock()
            self.state.elapsed_s += now - self._started
            self._started = now
            self._checkpoint(self.state)

    def _over_budget(self) -> bool:
        budget = self.task.token_budget
        return budget is not None and self.usage.total_tokens >= budget

    def _budget_exhausted(self) -> AgentResult:
        return self._result(
            TaskStatus.BUDGET_EXHAUSTED,
            error=ErrorInfo(
                type="TokenBudgetExhausted",
                message=f"used {self.usage.total_tokens} of token_budget={self.task.token_budget}",
            ),
        )

    def _result(self, status: TaskStatus, *, answer: Any = None, error: ErrorInfo | None = None) -> AgentResult:
        return AgentResult(
            task_id=self.task.task_id,
            **agent_fields(self.task),
            tenant=self.task.tenant,
            status=status,
            answer=answer if status == "succeeded" else self.last_text,
            error=error,
            usage=self.usage,
            iterations=self.iterations,
            tool_calls=self.state.tool_calls,
            llm_attempts=self.state.llm_attempts,
            trace_id=self.trace_id,
            model=self.state.model,
            stop_reason=self.state.stop_reason,
            resumes=self.state.resumes,
            llm_calls_saved=self.state.llm_calls_saved,
            session_id=self.task.session_id,
            escalations=self.state.escalations,
        )
