"""Admission's static checks: may this tenant run this task here at all?

`check` returns the rejection (an error) or None. Budgets, queue bounds and shedding are
decided after it, in the scheduler, from live state.
"""

from __future__ import annotations

from agentpool.config import PoolConfig
from agentpool.errors import AgentPoolError, InvalidTask, UnknownTenant, UnknownTool
from agentpool.models import AgentTask


class Admission:
    """Tenant, tool and model checks."""

    def __init__(self, config: PoolConfig, tool_names: set[str]) -> None:
        self.config = config
        self.tool_names = tool_names

    def check(self, task: AgentTask) -> AgentPoolError | None:
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
        return None
