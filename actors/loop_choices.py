"""What an agent loop spends and which model it runs on (no Ray): a task's dollar cap on
every call (`capped`), the way up the routing ladder of a routed task (`RoutedModels`, a
mixin of `AgentLoop`), and a structured answer checked against its schema."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from jsonschema import Draft202012Validator

from agentpool import events
from agentpool import telemetry as tm
from agentpool.actors.llm import LLMResponse
from agentpool.actors.session_task import CallLLM
from agentpool.conversation import estimate_input_tokens
from agentpool.events import Emit
from agentpool.models import ErrorInfo, Usage
from agentpool.pricing import PriceTable
from agentpool.redact import redact
from agentpool.routing import Routing
from agentpool.vocabulary import ErrorReason, EscalationReason

if TYPE_CHECKING:
    from agentpool.actors.checkpoint import LoopState
    from agentpool.models import AgentTask

_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)


class CostCapReached(Exception):
    """The next call's worst case could take the task over its `max_cost_usd`."""

    def __init__(self, cap_usd: float, worst_usd: float) -> None:
        self.cap_usd, self.worst_usd = cap_usd, worst_usd

    def error(self, spent_usd: float) -> ErrorInfo:
        return ErrorInfo(
            type="CostCapReached",
            message=(
                f"spent ${spent_usd:.6f} of max_cost_usd={self.cap_usd}; the next LLM call could cost up to "
                f"${self.worst_usd:.6f}"
            ),
            reason=ErrorReason.TASK_COST_CAP,
        )


def capped(
    call_llm: CallLLM, cap_usd: float, *, spent: Callable[[], float], prices: PriceTable, chars_per_token: float
) -> CallLLM:
    """`call_llm` behind a dollar cap: a call whose worst case on its model chain (its input
    estimated generously, at the dearest input rate, plus `max_tokens` of output) could take
    `spent()` over `cap_usd` is not sent (`CostCapReached`)."""

    async def call(request: dict[str, Any], models: list[str], emit: Emit) -> LLMResponse:
        input_tokens = estimate_input_tokens(request, chars_per_token)
        worst = prices.worst_cost_usd(models, input_tokens, int(request["max_tokens"]))
        if spent() + worst > cap_usd:
            raise CostCapReached(cap_usd, worst)
        return await call_llm(request, models, emit)

    return call


class RoutedModels:
    """A routed task's (`model="auto"`) way up its ladder: `_models` are the models left, the
    one in use first."""

    if TYPE_CHECKING:  # AgentLoop's
        task: AgentTask
        state: LoopState
        _routing: Routing | None
        _models: list[str]
        _emit: Emit

        @property
        def messages(self) -> list[dict[str, Any]]: ...

        def _save(self) -> None: ...

    def _asks_for_stronger(self) -> bool:
        """The answer carries the routing's escalation phrase, and a stronger model is left."""
        phrase = self._routing.escalate_when_answer_contains if self._routing is not None else None
        return phrase is not None and phrase in (self.state.last_text or "") and len(self._models) > 1

    async def _escalate(self, iteration: int, reason: EscalationReason) -> None:
        """Drops the last answer and asks the next model up the ladder, for the rest of the run."""
        self.messages.pop()
        weaker, self._models = self._models[0], self._models[1:]
        self.state.models = self._models
        await self._escalated(iteration, weaker, self._models[0], reason)
        self._save()

    async def _escalated(self, iteration: int, weaker: str, stronger: str, reason: EscalationReason) -> None:
        self.state.escalations += 1
        tm.escalations.add(1, {"agentpool.tenant": self.task.tenant, "reason": reason.value})
        await self._emit(
            events.ModelEscalated(iteration=iteration, from_model=weaker, to_model=stronger, reason=reason)
        )


def parse_structured(text: str, validator: Draft202012Validator) -> tuple[Any, str | None]:
    """The answer's JSON value (a fenced block is unwrapped), or None and what is wrong."""
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


def call_event(
    tenant: str, iteration: int, response: LLMResponse, usage: Usage, stop_reason: str | None
) -> events.LlmCall:
    """Counts one successful call's tokens and cost in the metrics; returns its `llm_call` event."""
    labels = {"agentpool.tenant": tenant, "gen_ai.request.model": response.model}
    for kind, count in (
        ("input", usage.input_tokens),
        ("output", usage.output_tokens),
        ("cache_read", usage.cache_read_input_tokens),
        ("cache_creation", usage.cache_creation_input_tokens),
    ):
        if count:
            tm.tokens.add(count, {**labels, "gen_ai.token.type": kind})
    tm.cost.add(usage.cost_usd, labels)
    return events.LlmCall(
        iteration=iteration,
        model=response.model,
        stop_reason=stop_reason,
        input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens,
        cache_read_input_tokens=usage.cache_read_input_tokens,
        cache_creation_input_tokens=usage.cache_creation_input_tokens,
        cost_usd=usage.cost_usd,
        latency_ms=round(response.latency_ms, 2),
        attempts=response.attempts,
        cached=response.cached,
        lane=response.lane,
    )


def shown_arguments(arguments: Any) -> dict[str, Any] | None:
    """A tool call's arguments as its `tool_call` event shows them: credential-named keys
    redacted, left out when large."""
    if not isinstance(arguments, dict):
        return None
    shown = redact(arguments, pii=False, numbers=False)
    if len(json.dumps(shown, default=str, separators=(",", ":"))) > events.MAX_EVENT_ARGS_BYTES:
        return None
    return shown
