"""A session's task inside the worker (no Ray): how to compact its history before the
first call, whether it is over its tenant's limits, the compaction call itself, and what
its final write stores of the session."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from agentpool import events
from agentpool.actors.checkpoint import LoopState
from agentpool.actors.llm import LLMResponse, priced_usage
from agentpool.cluster.sessions import SessionWrite
from agentpool.config import PoolConfig
from agentpool.conversation import compacted, compaction_cut, complete_part, estimate_tokens, summary_request
from agentpool.events import Emit
from agentpool.models import AgentResult, AgentTask, SessionPolicy
from agentpool.pricing import PriceTable
from agentpool.vocabulary import OnBusy, TaskStatus

CallLLM = Callable[[dict[str, Any], list[str], Emit], Awaitable[LLMResponse]]


@dataclass(frozen=True)
class Compaction:
    """Summarise the history's messages before `cut` with `model` before the first call."""

    cut: int
    model: str
    max_tokens: int
    chars_per_token: float


async def compact(
    state: LoopState, plan: Compaction, *, call_llm: CallLLM, prices: PriceTable, emit: Emit, session_id: str
) -> None:
    """Summarises the history's older messages into one (a call of its own, whose cost is
    the task's), keeping the newer ones as they are; `state` holds the result."""
    st = state
    history = st.messages[: st.history]
    older, kept = history[: plan.cut], history[plan.cut :]
    request = summary_request(older, max_tokens=plan.max_tokens)

    async def quiet(event: events.Event) -> None:  # the summary's text is not the answer's
        if not isinstance(event, events.TextDelta):
            await emit(event)

    response = await call_llm(request, [plan.model], quiet)
    usage = priced_usage(response, prices)
    st.usage = st.usage + usage
    st.llm_attempts += response.attempts
    summary = "".join(b.get("text", "") for b in response.message.get("content", []) if b.get("type") == "text")
    shorter = compacted(summary, kept)
    st.messages = [*shorter, *st.messages[st.history :]]
    st.history, st.compacted = len(shorter), True
    await emit(
        events.SessionCompacted(
            session_id=session_id,
            model=response.model,
            summarised=len(older),
            kept=len(kept),
            tokens_before=estimate_tokens(history, plan.chars_per_token),
            tokens_after=estimate_tokens(shorter, plan.chars_per_token),
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
            cost_usd=usage.cost_usd,
            lane=response.lane,
            cached=response.cached,
        )
    )


def compaction_plan(
    config: PoolConfig, task: AgentTask, policy: SessionPolicy, history: list[dict[str, Any]]
) -> Compaction | None:
    """How to compact the session's history before the task's first call, if it is over
    the tenant's threshold and has older turns to summarise."""
    threshold = policy.compact_above_tokens
    per_token = config.input_chars_per_token
    if threshold is None or estimate_tokens(history, per_token) <= threshold:
        return None
    cut = compaction_cut(history, policy.keep_recent_tokens, per_token)
    if cut == 0:
        return None
    model = policy.compaction_model or config.task_models(task)[0]
    return Compaction(cut=cut, model=model, max_tokens=policy.summary_max_tokens, chars_per_token=per_token)


def session_full(policy: SessionPolicy, history: list[dict[str, Any]]) -> str | None:
    """Why the history is over the tenant's limits, or None."""
    size = len(json.dumps(history, separators=(",", ":"), default=str))
    if len(history) >= policy.max_messages or size >= policy.max_bytes:
        return (
            f"the session holds {len(history)} messages ({size} bytes); the tenant's limits are "
            f"{policy.max_messages} messages and {policy.max_bytes} bytes: delete the session, or "
            "let compaction (compact_above_tokens) shorten it"
        )
    return None


def session_write(
    config: PoolConfig, task: AgentTask, state: LoopState | None, result: AgentResult, interrupted: OnBusy | None
) -> SessionWrite | None:
    """What the final write stores of the task's session: the whole new history when the
    task succeeded, the complete part of its turn when a later task interrupted it
    (`interrupt`), else nothing (the history stays as it was)."""
    if task.session_id is None:
        return None
    policy = config.policy_for(task.tenant) or config.default_tenant_policy
    messages: list[dict[str, Any]] | None = None
    if state is not None and state.session_version is not None:
        if result.status == TaskStatus.SUCCEEDED:
            messages = state.messages
        elif result.status == TaskStatus.CANCELLED and interrupted == OnBusy.INTERRUPT:
            messages = complete_part(state.messages)
    return SessionWrite(
        session_id=task.session_id,
        messages=json.dumps(messages, separators=(",", ":")) if messages is not None else None,
        expected_version=state.session_version or 0 if state is not None else 0,
        ttl_s=policy.sessions.ttl_s,
        compactions=int(messages is not None and state is not None and state.compacted),
    )
