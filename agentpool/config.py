"""Pool configuration: `PoolConfig`, read from arguments or `AGENTPOOL_*` environment variables."""

from __future__ import annotations

from pydantic import AliasChoices, BaseModel, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from agentpool.models import ModelName, TenantName, TenantPolicy
from agentpool.pricing import ModelPrice
from agentpool.simulator.config import SimulatorConfig

BUILTIN_TOOL_MODULE = "agentpool.builtin_tools"


class RetryPolicy(BaseModel):
    """Our retries of LLM calls (the SDK's own are off so each attempt is visible to us).

    Delay before attempt n+1 is `min(max_delay_s, base_delay_s * 2**n)` scaled by a random
    factor in [1 - jitter, 1], and never shorter than the provider's `retry-after`.
    """

    max_attempts_per_model: int = Field(default=4, ge=1, le=20)
    base_delay_s: float = Field(default=0.5, ge=0, le=60)
    max_delay_s: float = Field(default=20.0, ge=0, le=600)
    jitter: float = Field(default=0.5, ge=0, le=1)


class PoolConfig(BaseSettings):
    """Everything a pool needs; every field can come from `AGENTPOOL_<FIELD>`.

    With nothing set, `AgentPool.start(PoolConfig())` runs a local Ray, an embedded Redis and
    the simulated provider. Nested fields use `__`: `AGENTPOOL_SIMULATOR__LATENCY_MS=50`.
    """

    model_config = SettingsConfigDict(
        env_prefix="AGENTPOOL_", env_nested_delimiter="__", extra="forbid", populate_by_name=True
    )

    name: str = Field(default="agentpool", pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
    # --- infrastructure
    ray_address: str | None = Field(default=None, validation_alias=AliasChoices("ray_address", "RAY_ADDRESS"))
    redis_url: str | None = None
    key_prefix: str = Field(default="agentpool", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    result_ttl_s: int | None = Field(default=7 * 24 * 3600, ge=1)
    stream_maxlen: int = Field(default=100_000, ge=100)
    # --- provider
    anthropic_api_key: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices("anthropic_api_key", "ANTHROPIC_API_KEY"),
    )
    anthropic_base_url: str | None = Field(
        default=None, validation_alias=AliasChoices("anthropic_base_url", "ANTHROPIC_BASE_URL")
    )
    simulator: SimulatorConfig = Field(default_factory=SimulatorConfig)
    default_model: ModelName = "claude-sonnet-4-5"
    fallback_models: list[ModelName] = Field(default_factory=lambda: ["claude-haiku-4-5"])
    llm_request_timeout_s: float = Field(default=120.0, gt=0)
    retry: RetryPolicy = Field(default_factory=RetryPolicy)
    prices: dict[str, ModelPrice] = Field(default_factory=dict)
    # --- pool shape
    num_workers: int = Field(default=2, ge=1, le=1024)
    worker_concurrency: int = Field(default=64, ge=1, le=10_000)
    num_tool_executors: int = Field(default=1, ge=1, le=1024)
    executor_concurrency: int = Field(default=64, ge=1, le=10_000)
    max_queued: int = Field(default=10_000, ge=1, le=10_000_000)
    # --- tools and tenants
    tool_modules: list[str] = Field(default_factory=list)
    tool_output_max_chars: int = Field(default=20_000, ge=100, le=1_000_000)
    tenants: dict[TenantName, TenantPolicy] = Field(default_factory=dict)
    default_tenant_policy: TenantPolicy = Field(default_factory=TenantPolicy)
    strict_tenants: bool = False

    @property
    def uses_simulator(self) -> bool:
        return self.anthropic_api_key is None and self.anthropic_base_url is None

    @property
    def all_tool_modules(self) -> list[str]:
        return list(dict.fromkeys([BUILTIN_TOOL_MODULE, *self.tool_modules]))

    def policy_for(self, tenant: str) -> TenantPolicy | None:
        """The tenant's policy, the default for unknown tenants, or None under strict_tenants."""
        if tenant in self.tenants:
            return self.tenants[tenant]
        return None if self.strict_tenants else self.default_tenant_policy

    def model_chain(self, model: str | None, fallbacks: list[str] | None) -> list[str]:
        first = model or self.default_model
        rest = self.fallback_models if fallbacks is None else fallbacks
        return list(dict.fromkeys([first, *rest]))
