"""Admission: accept a task into the queue, or reject it now with a typed reason.

This is the seam the admission-control work replaces with quotas, rate buckets and
shedding: `check` returns an error (the rejection) or None (admit).
"""

from __future__ import annotations

from agentpool.config import PoolConfig
from agentpool.errors import AgentPoolError, InvalidTask, Overloaded, UnknownTenant, UnknownTool
from agentpool.models import AgentTask


class Admission:
    """Bounded-queue admission with tenant, tool and model checks."""

    def __init__(self, config: PoolConfig, tool_names: set[str]) -> None:
        self.config = config
        self.tool_names = tool_names

    def check(
        self, task: AgentTask, *, queued: int, in_flight: int, capacity: int, mean_run_s: float
    ) -> AgentPoolError | None:
        policy = self.config.policy_for(task.tenant)
        if policy is None:
            return UnknownTenant(f"tenant {task.tenant!r} has no policy and strict_tenants is set", tenant=task.tenant)
        unknown = [t for t in task.tools if t not in self.tool_names]
        if unknown:
            return UnknownTool(
                f"unknown tools {unknown}; registered: {sorted(self.tool_names)}", tenant=task.tenant, tools=unknown
            )
        if policy.allowed_tools is not None:
            denied = [t for t in task.tools if t not in policy.allowed_tools]
            if denied:
                return UnknownTool(
                    f"tools {denied} are not allowed for tenant {task.tenant!r}", tenant=task.tenant, tools=denied
                )
        if policy.allowed_models is not None:
            chain = self.config.model_chain(task.model, task.fallback_models)
            if not [m for m in chain if m in policy.allowed_models]:
                return InvalidTask(
                    f"none of the models {chain} is allowed for tenant {task.tenant!r}",
                    tenant=task.tenant,
                    models=chain,
                )
        if queued >= self.config.max_queued:
            # Expected time for the queue ahead to drain through every slot of the pool.
            wait_s = max(0.1, mean_run_s * (queued + in_flight) / max(1, capacity))
            return Overloaded(
                f"queue is full ({queued} tasks waiting)",
                tenant=task.tenant,
                retry_after_s=round(wait_s, 3),
                reason="queue_full",
            )
        return None
