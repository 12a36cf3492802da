"""agentpool: a distributed pool of LLM agent workers on Ray.

pool = AgentPool.start(PoolConfig())
results = ray.get(pool.submit([AgentTask(tenant="acme", prompt="What is 1234*5678?",
                                         tools=["calculator"])]))
"""

from agentpool.config import BreakerConfig, ExecutorGroupConfig, PoolConfig, RetryPolicy
from agentpool.errors import (
    AgentPoolError,
    BudgetExceeded,
    ConfigError,
    InvalidTask,
    Overloaded,
    PoolNotRunning,
    ProviderError,
    QuotaExceeded,
    RetryLater,
    ToolError,
    UnknownTenant,
    UnknownTool,
)
from agentpool.models import (
    AgentResult,
    AgentTask,
    ErrorInfo,
    RateLimit,
    TenantPolicy,
    Timings,
    ToolCallSummary,
    Usage,
)
from agentpool.pool import AgentPool
from agentpool.simulator.config import SimulatorConfig
from agentpool.tools import tool

__all__ = [
    "AgentPool",
    "AgentPoolError",
    "AgentResult",
    "AgentTask",
    "BreakerConfig",
    "BudgetExceeded",
    "ConfigError",
    "ErrorInfo",
    "ExecutorGroupConfig",
    "InvalidTask",
    "Overloaded",
    "PoolConfig",
    "PoolNotRunning",
    "ProviderError",
    "QuotaExceeded",
    "RateLimit",
    "RetryLater",
    "RetryPolicy",
    "SimulatorConfig",
    "TenantPolicy",
    "Timings",
    "ToolCallSummary",
    "ToolError",
    "UnknownTenant",
    "UnknownTool",
    "Usage",
    "tool",
]
