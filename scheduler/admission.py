"""Admission's static checks: may this tenant run this task here at all?

`check` returns the rejection (an error) or None. Budgets, queue bounds and shedding are
decided after it, in the scheduler, from live state.
"""

from __future__ import annotations

from agentpool.config import PoolConfig
from agentpool.errors import AgentPoolError, InjectionDetected, InvalidTask, UnknownTenant, UnknownTool
from agentpool.guardrails import screen
from agentpool.models import AgentTask, Guardrails
from agentpool.vocabulary import ErrorReason, Lane


def screen_task(task: AgentTask, guard: Guardrails) -> tuple[dict[str, list[str]], InjectionDetected | None]:
    """The tenant's prompt-injection screen over the task's own text: the rules each part
    matched (`prompt`, `system`), and the refusal when the guardrails block."""
    findings = {
        source: rules
        for source, text in (("prompt", task.prompt), ("system", task.system or ""))
        if (rules := screen(text))
    }
    if not findings or guard.injection != "block":
        return findings, None
    named = sorted({rule for rules in findings.values() for rule in rules})
    return findings, InjectionDetected(
        f"the task's {' and '.join(findings)} look like a prompt injection ({', '.join(named)})",
        reason=ErrorReason.PROMPT_INJECTION,
        rules=named,
    )


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
        if task.lane is Lane.BATCH and not self.config.batch_lane.enabled:
            return InvalidTask(
                "this pool has no batch lane: start it with PoolConfig(batch_lane=BatchLaneConfig(enabled=True))",
                tenant=task.tenant,
            )
        routed = self.config.routing_for(task) is not None
        # A chain is never empty unless the tenant's allowed models, or the ladder's tiers, leave nothing.
        if (routed or policy.allowed_models is not None) and not self.config.task_models(task):
            if routed:
                return InvalidTask(
                    f"no model of the routing ladder allowed for tenant {task.tenant!r} has tier {task.tier or 1} "
                    "or more",
                    tenant=task.tenant,
                    tier=task.tier or 1,
                )
            chain = self.config.model_chain(task.model, task.fallback_models)
            return InvalidTask(
                f"none of the models {chain} is allowed for tenant {task.tenant!r}", tenant=task.tenant, models=chain
            )
        return None
