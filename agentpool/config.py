"""Pool configuration: `PoolConfig`, read from arguments or `AGENTPOOL_*` environment variables."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AliasChoices,
    Field,
    SecretStr,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from pydantic_settings.exceptions import SettingsError

from agentpool.config_parts import AdmissionConfig as AdmissionConfig
from agentpool.config_parts import AlertConfig as AlertConfig
from agentpool.config_parts import AutoscaleConfig as AutoscaleConfig
from agentpool.config_parts import BreakerConfig as BreakerConfig
from agentpool.config_parts import ExecutorGroupConfig as ExecutorGroupConfig
from agentpool.config_parts import HttpConfig as HttpConfig
from agentpool.config_parts import Isolation as Isolation
from agentpool.config_parts import PlacementConfig as PlacementConfig
from agentpool.config_parts import RetryPolicy as RetryPolicy
from agentpool.config_parts import WebhookConfig as WebhookConfig
from agentpool.lanes import BatchLaneConfig
from agentpool.models import AgentTask, ModelName, RateLimit, TenantName, TenantPolicy
from agentpool.pricing import ModelPrice, PriceTable
from agentpool.routing import AUTO, Routing, route
from agentpool.simulator.config import SimulatorConfig

BUILTIN_TOOL_MODULE = "agentpool.builtin_tools"
#: The fields `pool.update_config` changes while the pool runs; any other needs a restart.
LIVE_FIELDS: tuple[str, ...] = ("tenants", "default_tenant_policy", "strict_tenants", "limits", "max_queued")
REDIS_SCHEMES = ("redis", "rediss", "unix", "redis+sentinel", "rediss+sentinel")


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
    ray_address: str | None = Field(
        default=None, validation_alias=AliasChoices("ray_address", "AGENTPOOL_RAY_ADDRESS", "RAY_ADDRESS")
    )
    redis_url: str | None = None
    key_prefix: str = Field(default="agentpool", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    result_ttl_s: int | None = Field(default=7 * 24 * 3600, ge=1)
    stream_maxlen: int = Field(default=100_000, ge=100)
    #: Each task's events are also kept in a stream of their own (`...:events:<task_id>`),
    #: which `pool.events(task_id)` and the HTTP API's SSE follow, for this long after its
    #: latest event; 0 keeps none (a task's events are then only in its tenant's stream).
    task_events_ttl_s: int = Field(default=3600, ge=0, le=30 * 24 * 3600)
    #: The most entries one task's stream keeps (about; the oldest go first).
    task_events_maxlen: int = Field(default=2000, ge=100, le=1_000_000)
    # --- provider
    anthropic_api_key: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices("anthropic_api_key", "AGENTPOOL_ANTHROPIC_API_KEY", "ANTHROPIC_API_KEY"),
    )
    #: A file holding the key instead (a Docker or Kubernetes secret, a root-owned file not
    #: readable by every user); read once, at configuration.
    anthropic_api_key_file: Path | None = Field(
        default=None,
        validation_alias=AliasChoices(
            "anthropic_api_key_file", "AGENTPOOL_ANTHROPIC_API_KEY_FILE", "ANTHROPIC_API_KEY_FILE"
        ),
    )
    anthropic_base_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("anthropic_base_url", "AGENTPOOL_ANTHROPIC_BASE_URL", "ANTHROPIC_BASE_URL"),
    )
    simulator: SimulatorConfig = Field(default_factory=SimulatorConfig)
    default_model: ModelName = "claude-sonnet-4-5"
    fallback_models: Annotated[list[ModelName], NoDecode] = Field(default_factory=lambda: ["claude-haiku-4-5"])
    llm_request_timeout_s: float = Field(default=120.0, gt=0)
    retry: RetryPolicy = Field(default_factory=RetryPolicy)
    #: Global provider limits: a model name, or a prefix naming a class of models that share
    #: one set of buckets ("claude-sonnet-4" covers "claude-sonnet-4-5"); the longest match wins.
    limits: dict[str, RateLimit] = Field(default_factory=dict)
    #: What an LLM call reserves on the output-token bucket before it is sent: its whole
    #: `max_tokens` (never over the limit), or an estimate from recent calls of that model
    #: (higher throughput; a rare underestimate is repaid before later calls proceed).
    output_reservation: Literal["max_tokens", "estimate"] = "max_tokens"
    #: Characters per token assumed when estimating a request's input tokens before sending
    #: it; below the real ratio on purpose (reservations are reconciled with `usage` after).
    input_chars_per_token: float = Field(default=3.0, gt=0.5, le=10)
    #: A call is granted only when the bucket holds its amount plus this many seconds of
    #: refill: the provider counts a request when it arrives, a little after we grant it,
    #: so its bucket can lag ours by that long.
    limit_margin_s: float = Field(default=0.25, ge=0, le=10)
    #: A rate permit not released within this many seconds is reclaimed (its holder is dead).
    lease_ttl_s: float | None = Field(default=None, gt=0, le=86_400)
    prices: dict[str, ModelPrice] = Field(default_factory=dict)
    #: How tasks with `model="auto"` are routed (a tenant may have its own,
    #: `TenantPolicy.routing`).
    routing: Routing = Field(default_factory=Routing)
    # --- pool shape
    num_workers: int = Field(default=2, ge=1, le=1024)
    worker_concurrency: int = Field(default=64, ge=1, le=10_000)
    #: Worker autoscaling; None keeps `num_workers` fixed. With it, the pool starts with
    #: `num_workers` brought within [min_workers, max_workers].
    autoscale: AutoscaleConfig | None = None
    placement: PlacementConfig = Field(default_factory=PlacementConfig)
    num_tool_executors: int = Field(default=1, ge=1, le=1024)
    executor_concurrency: int = Field(default=64, ge=1, le=10_000)
    #: Accepted tasks waiting for a worker, at most: in memory and in the Redis backlog.
    #: Replicas that must hold each admission and final record before the write counts
    #: (Redis WAIT; 0: none). With a primary that Sentinel fails over, 1 keeps every accepted
    #: task and record through a failover (see README, "Redis beyond one server").
    redis_wait_replicas: int = Field(default=0, ge=0, le=16)
    #: How long such a write waits for its replicas (ms); past it the write counts anyway,
    #: and `status()["redis"]["unreplicated"]` counts it.
    redis_wait_timeout_ms: int = Field(default=1000, ge=1, le=60_000)
    max_queued: int = Field(default=1_000_000, ge=1, le=100_000_000)
    #: Batch tasks (no deadline) queued in the scheduler's memory at most; the rest wait in
    #: the Redis backlog and are read back as the queue drains (interactive work is always
    #: queued in memory: its deadline bounds it).
    queue_window: int = Field(default=2_000, ge=1, le=1_000_000)
    #: `submit` calls a client keeps waiting at the scheduler itself, at most (one Ray hop
    #: less each: the latency of a few tasks at a time); beyond them its calls wait in the
    #: relay, so the scheduler's memory is bounded per client, not per task.
    submit_direct_calls: int = Field(default=256, ge=0, le=10_000)
    admission: AdmissionConfig = Field(default_factory=AdmissionConfig)
    # --- tools and tenants
    tool_modules: Annotated[list[str], NoDecode] = Field(default_factory=list)
    tool_output_max_chars: int = Field(default=20_000, ge=100, le=1_000_000)
    #: Executor groups besides "default" (whose shape is num_tool_executors x executor_concurrency);
    #: a tool pinned to a group not listed here gets a group of one executor.
    executor_groups: dict[str, ExecutorGroupConfig] = Field(default_factory=dict, max_length=64)
    #: Circuit breaker of every tool that does not declare its own.
    breaker: BreakerConfig = Field(default_factory=BreakerConfig)
    #: Longest a call waits for a free place under its tool's `max_concurrency` before it is refused.
    bulkhead_wait_s: float = Field(default=1.0, ge=0, le=600)
    tenants: dict[TenantName, TenantPolicy] = Field(default_factory=dict)
    default_tenant_policy: TenantPolicy = Field(default_factory=TenantPolicy)
    strict_tenants: bool = False
    # --- durability
    #: How long a task waits for a human's decision on a tool that requires approval.
    approval_timeout_s: float = Field(default=3600.0, gt=0, le=30 * 86_400)
    #: How long a checkpoint outlives its last write (it goes at once when the task ends).
    checkpoint_ttl_s: int = Field(default=2 * 86_400, ge=60, le=90 * 86_400)
    #: A run's lease on its task lapses this long after its worker last renewed it; a
    #: scheduler re-dispatching the task waits at most this long for a run that vanished.
    run_lease_s: float = Field(default=15.0, ge=1, le=600)
    #: Times a task is dispatched again after its worker died under it, before it fails.
    max_redispatch: int = Field(default=3, ge=0, le=100)
    # --- observability (traces and metrics are configured by the standard OTEL_* variables)
    #: Every structured event also as one JSON line on the `agentpool.events` logger, which
    #: writes to the actor's stderr (Ray's worker log files) when this is on.
    event_log: bool = False
    #: The audit trail of tool calls is append-only: None keeps every entry; a number trims
    #: the stream to about that many (retention).
    audit_maxlen: int | None = Field(default=None, ge=1000)
    alerts: AlertConfig = Field(default_factory=AlertConfig)
    http: HttpConfig = Field(default_factory=HttpConfig)
    webhooks: WebhookConfig = Field(default_factory=WebhookConfig)
    #: The lane through the Message Batches API for work that can wait (off by default).
    batch_lane: BatchLaneConfig = Field(default_factory=BatchLaneConfig)
    # --- security
    #: Refuse to run on a Ray cluster without token authentication (`RAY_AUTH_MODE=token`,
    #: Ray's default for a local cluster): anyone who reaches an unauthenticated cluster
    #: runs code in it, and reads the key.
    require_ray_auth: bool = True
    #: Start the Ray dashboard with a pool-started local cluster (never for `ray up`: that is
    #: `ray start --dashboard-host`), listening on `dashboard_host` only.
    dashboard: bool = False
    dashboard_host: str = "127.0.0.1"

    def __init__(self, **values: Any) -> None:
        """Builds the configuration from `values`, then `AGENTPOOL_*` variables, then defaults.

        Raises:
            InvalidConfig: If an `AGENTPOOL_*` variable is not a setting, or its value is not
                valid (the message names the variable and the format expected).
            pydantic.ValidationError: If an argument given here is not valid.
        """
        from agentpool.config_env import explain, unknown_variables
        from agentpool.errors import InvalidConfig

        unknown = unknown_variables(type(self), os.environ)
        if unknown:
            raise InvalidConfig("; ".join(unknown), problems=unknown)
        try:
            super().__init__(**values)
        except (ValidationError, SettingsError) as exc:
            told = explain(exc, values, os.environ)
            if told is None:
                raise
            raise told from None

    @field_validator("tool_modules", "fallback_models", mode="before")
    @classmethod
    def _list_or_csv(cls, value: Any) -> Any:
        """A JSON list, or (from an environment variable) names separated by commas."""
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [part.strip() for part in text.split(",") if part.strip()]
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, url: str | None) -> str | None:
        if url is None:
            return None
        parts = urlsplit(url)
        if parts.scheme.endswith(("+sentinel", "+cluster")):
            from agentpool.redis_url import cluster_target, sentinel_target

            sentinel_target(url)  # a bad one raises ValueError, saying why
            cluster_target(url)
            return url
        try:
            _ = parts.port  # out of range or not a number raises
        except ValueError:
            raise ValueError("the port must be a number from 1 to 65535") from None
        if parts.scheme not in REDIS_SCHEMES or not (parts.hostname or parts.path):
            raise ValueError(
                "expected a redis://, rediss://, unix://, redis+sentinel:// or redis+cluster:// URL, "
                "e.g. redis://localhost:6379/0, redis://:PASSWORD@host:6379/0, "
                "redis+sentinel://:PASSWORD@s1:26379,s2:26379,s3:26379/mymaster or redis+cluster://:PASSWORD@n1:6379,n2:6379"
            )
        return url

    @model_validator(mode="after")
    def _key_from_file(self) -> PoolConfig:
        if self.anthropic_api_key_file is not None:
            from agentpool.config_env import read_secret_file

            if self.anthropic_api_key is not None:
                raise ValueError("set the Anthropic key or a file holding it, not both")
            self.anthropic_api_key = read_secret_file(self.anthropic_api_key_file)
        return self

    def with_live(self, changes: Mapping[str, Any]) -> PoolConfig:
        """This configuration with `changes` to its live fields (`LIVE_FIELDS`), each value
        validated as the field is (a model or its JSON-ready dict alike).

        Raises:
            InvalidConfig: If a field is not a live one, or a value is not valid for it.
        """
        from agentpool.errors import InvalidConfig

        others = sorted(set(changes) - set(LIVE_FIELDS))
        if others:
            line = f"{', '.join(others)}: not changeable while the pool runs (only {', '.join(LIVE_FIELDS)})"
            raise InvalidConfig(line, problems=[line])
        update: dict[str, Any] = {}
        for name, value in changes.items():
            field = type(self).model_fields[name]
            try:
                kind: Any = Annotated[field.annotation, *field.metadata] if field.metadata else field.annotation
                update[name] = TypeAdapter(kind).validate_python(value)
            except ValidationError as exc:
                first = exc.errors(include_url=False)[0]
                where = ".".join(str(p) for p in (name, *first["loc"]))
                line = f"{where}: {first['msg']}"
                raise InvalidConfig(f"invalid live configuration: {line}", problems=[line]) from None
        return self.model_copy(update=update)

    def live_fields(self) -> dict[str, Any]:
        """The live fields' values, JSON-ready (what Redis keeps of `update_config`)."""
        return self.model_dump(mode="json", include=set(LIVE_FIELDS))

    def for_actors(self) -> PoolConfig:
        """This configuration without the provider key, as the pool's actors get it: only the
        agent workers hold the key, passed to them apart."""
        return self.model_copy(update={"anthropic_api_key": None, "anthropic_api_key_file": None})

    @property
    def uses_simulator(self) -> bool:
        return self.anthropic_api_key is None and self.anthropic_base_url is None

    def worker_name(self, index: int) -> str:
        """The named actor of agent worker `index` (workers the autoscaler adds count on)."""
        return f"{self.name}-worker-{index}"

    @property
    def initial_workers(self) -> int:
        a = self.autoscale
        return self.num_workers if a is None else min(a.max_workers, max(a.min_workers, self.num_workers))

    @property
    def max_workers(self) -> int:
        return self.num_workers if self.autoscale is None else self.autoscale.max_workers

    @property
    def all_tool_modules(self) -> list[str]:
        return list(dict.fromkeys([BUILTIN_TOOL_MODULE, *self.tool_modules]))

    def executor_group(self, group: str) -> ExecutorGroupConfig:
        if group in self.executor_groups:
            return self.executor_groups[group]
        if group == "default":
            return ExecutorGroupConfig(executors=self.num_tool_executors, concurrency=self.executor_concurrency)
        return ExecutorGroupConfig()

    def policy_for(self, tenant: str) -> TenantPolicy | None:
        """The tenant's policy, the default for unknown tenants, or None under strict_tenants."""
        if tenant in self.tenants:
            return self.tenants[tenant]
        return None if self.strict_tenants else self.default_tenant_policy

    @property
    def lease_expiry_s(self) -> float:
        return self.lease_ttl_s if self.lease_ttl_s is not None else self.llm_request_timeout_s + 30.0

    def limit_key(self, model: str) -> str | None:
        """The `limits` entry governing `model`: exact name, else the longest matching prefix."""
        if model in self.limits:
            return model
        matches = [key for key in self.limits if model.startswith(key)]
        return max(matches, key=len) if matches else None

    def model_chain(self, model: str | None, fallbacks: list[str] | None) -> list[str]:
        first = model or self.default_model
        rest = self.fallback_models if fallbacks is None else fallbacks
        return list(dict.fromkeys([first, *rest]))

    def routing_for(self, task: AgentTask) -> Routing | None:
        """How `task` is routed, if it asks for routing (`model="auto"`): its tenant's rules,
        else the pool's."""
        if (task.model or self.default_model) != AUTO:
            return None
        policy = self.policy_for(task.tenant)
        return policy.routing if policy is not None and policy.routing is not None else self.routing

    def task_models(self, task: AgentTask) -> list[str]:
        """The models `task` will try, in order: its chain less what its tenant may not use;
        for `model="auto"`, its route up the routing ladder (`agentpool.routing.route`)."""
        routing = self.routing_for(task)
        if routing is None:
            return self.models_for(task.tenant, task.model, task.fallback_models)
        policy = self.policy_for(task.tenant)
        allowed = policy.allowed_models if policy is not None else None
        table = PriceTable(self.prices)

        def list_price(model: str) -> float:
            price = table.price(model)
            return price.input + price.output if price is not None else 0.0

        return route(routing, task.tier or 1, allowed, list_price)

    def models_for(self, tenant: str, model: str | None, fallbacks: list[str] | None) -> list[str]:
        """The models a task of `tenant` will try, in order: its chain, less what the tenant may not use."""
        chain = self.model_chain(model, fallbacks)
        policy = self.policy_for(tenant)
        if policy is not None and policy.allowed_models is not None:
            chain = [m for m in chain if m in policy.allowed_models]
        return chain
