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
    AgentPoolError,
    BudgetExceeded,
    ConfigError,
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
    TaskPhase,
    TaskStatus,
    ToolErrorKind,
)

if TYPE_CHECKING:
    from agentpool.pool import AgentPool


def __getattr__(name: str) -> Any:
    """`AgentPool` (and with it Ray and Redis) is imported on first use, so that a module of
    tools (`from agentpool import tool`) stays light, as in a tool sandbox's zygote."""
    if name == "AgentPool":
        from agentpool.pool import AgentPool

        return AgentPool
    raise AttributeError(f"module 'agentpool' has no attribute {name!r}")


__all__ = [
    "AgentPool",
    "AgentPoolError",
    "AgentResult",
    "AgentTask",
    "AutoscaleConfig",
    "BatchLaneConfig",
    "BreakerConfig",
    "BudgetExceeded",
    "CacheMode",
    "ConfigError",
    "ErrorInfo",
    "ErrorReason",
    "EscalationReason",
    "EventType",
    "ExecutorGroupConfig",
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
    "UnknownTenant",
    "UnknownTool",
    "Usage",
    "tool",
]
