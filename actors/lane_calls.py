"""LLM calls of batch-lane tasks (`Lane.BATCH`): through the worker's `BatchLane`, with the
task's budget reserved as on the real-time lane (no rate permit), and on the real-time lane
when the batch lane does not answer in the task's time."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from agentpool import events
from agentpool.actors.batch_lane import BatchLane, LaneMissed
from agentpool.actors.gate import TaskGate
from agentpool.actors.llm import LLMResponse
from agentpool.actors.session_task import CallLLM
from agentpool.events import Emit
from agentpool.vocabulary import Lane


def through_batch_lane(
    realtime: CallLLM, lane: BatchLane, gate: TaskGate, *, give_up_at: Callable[[], float]
) -> CallLLM:
    """`realtime`, with each call tried on the batch lane first (on the chain's first model)
    until `give_up_at()` (the batch lane's clock); a miss sends it on the real-time lane
    (`lane_fallback` event), which retries and falls back as it always does."""

    async def call_llm(request: dict[str, Any], models: list[str], emit: Emit) -> LLMResponse:
        model = models[0]
        ticket = await gate.before(model, request, batch=True)
        started = time.monotonic()
        try:
            message = await lane.call(request, model, give_up_at=give_up_at())
        except LaneMissed as missed:
            await gate.after(ticket, usage=None, headers=None, retry_after_s=None)
            await emit(events.LaneFallback(model=model, reason=str(missed)[:500]))
            return await realtime(request, models, emit)
        except BaseException:
            gate.abandon(ticket)
            raise
        await gate.after(ticket, usage=message.get("usage"), headers=None, retry_after_s=None)
        latency_ms = (time.monotonic() - started) * 1000
        return LLMResponse(message, model, attempts=1, latency_ms=latency_ms, lane=Lane.BATCH)

    return call_llm
