"""Validation at the edge: bad input is a clear, typed error before anything is queued."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from agentpool import AgentTask, PoolConfig, TenantPolicy


@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [
        ("tenant", "acme:{beta}", "tenant"),
        ("tenant", "a*", "tenant"),
        ("tenant", "", "tenant"),
        ("prompt", "", "prompt"),
        ("prompt", "x" * 200_001, "prompt"),
        ("tools", ["calculator; rm -rf"], "tools"),
        ("tools", [f"t{i}" for i in range(65)], "tools"),
        ("max_iterations", 0, "max_iterations"),
        ("max_tokens", 10**6, "max_tokens"),
        ("timeout_s", -1, "timeout_s"),
        ("output_schema", {"type": "no-such-type"}, "JSON Schema"),
        ("output_schema", {"properties": {"a": {"type": "string", "description": "x" * 40_000}}}, "bytes"),
        ("metadata", {f"k{i}": i for i in range(40)}, "metadata"),
        ("task_id", "has space", "task_id"),
        ("priority", "urgent", "priority"),
    ],
)
def test_bad_tasks_are_rejected_with_the_field_named(field: str, value: object, fragment: str) -> None:
    args = {"tenant": "acme", "prompt": "hi", field: value}
    with pytest.raises(ValidationError) as info:
        AgentTask(**args)  # type: ignore[arg-type]
    assert fragment in str(info.value)


def test_deeply_nested_schema_is_refused() -> None:
    schema: dict = {"type": "object"}
    for _ in range(20):
        schema = {"type": "object", "properties": {"a": schema}}
    with pytest.raises(ValidationError, match="nests deeper"):
        AgentTask(tenant="acme", prompt="hi", output_schema=schema)


def test_unknown_fields_are_refused() -> None:
    with pytest.raises(ValidationError, match="extra"):
        AgentTask(tenant="acme", prompt="hi", temprature=1)  # type: ignore[call-arg]


def test_defaults_and_idempotency_key() -> None:
    a, b = AgentTask(tenant="acme", prompt="hi"), AgentTask(tenant="acme", prompt="hi")
    assert a.task_id != b.task_id and len(a.task_id) == 32
    assert a.priority == "standard" and a.max_iterations == 10
    assert AgentTask(tenant="acme", prompt="hi", tools=["a", "a", "b"]).tools == ["a", "b"]


def test_pool_config_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENTPOOL_NUM_WORKERS", "5")
    monkeypatch.setenv("AGENTPOOL_SIMULATOR__LATENCY_MS", "77")
    monkeypatch.setenv("AGENTPOOL_TOOL_MODULES", '["myapp.tools"]')
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-from-env")
    config = PoolConfig()
    assert config.num_workers == 5 and config.simulator.latency_ms == 77
    assert config.all_tool_modules == ["agentpool.builtin_tools", "myapp.tools"]
    assert config.anthropic_api_key.get_secret_value() == "sk-from-env" and not config.uses_simulator


def test_tenant_policies() -> None:
    config = PoolConfig(tenants={"acme": TenantPolicy(allowed_tools=["calculator"])}, strict_tenants=True)
    assert config.policy_for("acme").allowed_tools == ["calculator"]
    assert config.policy_for("other") is None
    assert PoolConfig().policy_for("other") == TenantPolicy()
    assert PoolConfig(fallback_models=["b"]).model_chain("a", None) == ["a", "b"]
    assert PoolConfig().model_chain("a", ["a", "c"]) == ["a", "c"]
