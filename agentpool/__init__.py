"""agentpool: a distributed pool of LLM agent workers on Ray.

pool = AgentPool.start(PoolConfig())
results = ray.get(pool.submit([AgentTask(tenant="acme", prompt="What is 1234*5678?",
                                         tools=["calculator"])]))
"""

from typing import TYPE_CHECKING, Any

from agentpool.config import (
    AutoscaleConfig,
    BreakerConfig,
    ExecutorGroupConfig,
    PlacementConfig,
    PoolConfig,
    RetryPolicy,
)
from agentpool.errors import (
    AgentConflict,
    AgentPoolError,
    BudgetExceeded,
    ConfigError,
    Draining,
    InvalidConfig,
    InvalidTask,
    InvalidTaskInput,
    Overloaded,
    PoolNotRunning,
    ProviderError,
    RetryLater,
    SessionBusy,
    StoreError,
    StoreUnavailable,
    ToolError,
    UnknownAgent,
    UnknownTenant,
    UnknownTool,
)
from agentpool.lanes import BatchLaneConfig
from agentpool.models import (
    AgentResult,
    AgentTask,
    ErrorInfo,
    Guardrails,
    RateLimit,
    SessionPolicy,
    TaskState,
    TenantPolicy,
    Timings,
    ToolCallSummary,
    Usage,
)
from agentpool.pricing import ModelPrice
from agentpool.results import DrainReport
from agentpool.routing import RoutedModel, Routing
from agentpool.simulator.config import SimulatorConfig
from agentpool.tools import tool
from agentpool.vocabulary import (
    CacheMode,
    ErrorReason,
    EscalationReason,
    EventType,
    Lane,
    OnBusy,
    RolloutPhase,
    TaskPhase,
    TaskStatus,
    ToolErrorKind,
    Variant,
    Verdict,
)

if TYPE_CHECKING:
    from agentpool.agents import AgentSpec, AgentVersion
    from agentpool.evals import EvalSuite, Expect, Gate
    from agentpool.pool import AgentPool
    from agentpool.rollouts import Rollout, RolloutRule

#: Names imported on first use: `AgentPool` (and with it Ray and Redis), and the agents',
#: evals' and rollouts' models (YAML and JSON Schema), so that a module of tools
#: (`from agentpool import tool`) stays light, as in a tool sandbox's zygote.
_LAZY = {
    "AgentPool": "agentpool.pool",
    "AgentSpec": "agentpool.agents",
    "AgentVersion": "agentpool.agents",
    "EvalSuite": "agentpool.evals",
    "Expect": "agentpool.evals",
    "Gate": "agentpool.evals",
    "Rollout": "agentpool.rollouts",
    "RolloutRule": "agentpool.rollouts",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'agentpool' has no attribute {name!r}")


__all__ = [
    "AgentConflict",
    "AgentPool",
    "AgentPoolError",
    "AgentResult",
    "AgentSpec",
    "AgentTask",
    "AgentVersion",
    "AutoscaleConfig",
    "BatchLaneConfig",
    "BreakerConfig",
    "BudgetExceeded",
    "CacheMode",
    "ConfigError",
    "DrainReport",
    "Draining",
    "ErrorInfo",
    "ErrorReason",
    "EscalationReason",
    "EvalSuite",
    "EventType",
    "ExecutorGroupConfig",
    "Expect",
    "Gate",
    "Guardrails",
    "InvalidConfig",
    "InvalidTask",
    "InvalidTaskInput",
    "Lane",
    "ModelPrice",
    "OnBusy",
    "Overloaded",
    "PlacementConfig",
    "PoolConfig",
    "PoolNotRunning",
    "ProviderError",
    "RateLimit",
    "RetryLater",
    "RetryPolicy",
    "Rollout",
    "RolloutPhase",
    "RolloutRule",
    "RoutedModel",
    "Routing",
    "SessionBusy",
    "SessionPolicy",
    "SimulatorConfig",
    "StoreError",
    "StoreUnavailable",
    "TaskPhase",
    "TaskState",
    "TaskStatus",
    "TenantPolicy",
    "Timings",
    "ToolCallSummary",
    "ToolError",
    "ToolErrorKind",
    "UnknownAgent",
    "UnknownTenant",
    "UnknownTool",
    "Usage",
    "Variant",
    "Verdict",
    "tool",
]
