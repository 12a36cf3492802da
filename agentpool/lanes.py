"""The batch lane's settings, and which lane a task's LLM calls take (`Lane`)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from agentpool.models import AgentTask
from agentpool.vocabulary import Lane

#: Anthropic's limits on one Message Batch.
MAX_BATCH_REQUESTS = 100_000
MAX_BATCH_BYTES = 256 * 1024 * 1024


class BatchLaneConfig(BaseModel):
    """The lane through the Message Batches API (50% off input and output tokens), for work
    that can wait. Each agent worker groups its tasks' calls for `window_s` (or until
    `max_requests` or `max_bytes`) into one batch, polls it every `poll_s`, and hands each
    result back to its agent loop, which goes on as on the real-time lane. A call still
    unanswered when its task has less than `realtime_reserve_s` left, or whose request
    errored or expired in the batch, is sent on the real-time lane instead."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = False
    #: Tasks that name no lane take the batch lane when their `deadline_s` is at least this.
    deadline_threshold_s: float | None = Field(default=3600.0, gt=0, le=86_400)
    window_s: float = Field(default=2.0, gt=0, le=3600)
    max_requests: int = Field(default=10_000, ge=1, le=MAX_BATCH_REQUESTS)
    max_bytes: int = Field(default=128 * 1024 * 1024, ge=1024, le=MAX_BATCH_BYTES)
    poll_s: float = Field(default=10.0, gt=0, le=3600)
    realtime_reserve_s: float = Field(default=120.0, ge=0, le=86_400)


def lane_of(task: AgentTask, config: BatchLaneConfig) -> Lane:
    """The task's lane: its own choice, else the batch lane for a task whose deadline is far
    enough and whose `timeout_s` leaves time to wait for batches (more than
    `realtime_reserve_s`), when the pool has the lane; else real time."""
    if task.lane is not None:
        return task.lane
    far = config.deadline_threshold_s is not None and (task.deadline_s or 0) >= config.deadline_threshold_s
    room = task.timeout_s > config.realtime_reserve_s
    return Lane.BATCH if config.enabled and far and room else Lane.REALTIME
