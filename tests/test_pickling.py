"""Everything that crosses an actor boundary survives pickling with its fields."""

from __future__ import annotations

import pickle

import pytest
import ray.cloudpickle

from agentpool.config import PoolConfig
from agentpool.errors import ALL_ERRORS, AgentPoolError, InvalidTaskInput, ProviderError, RetryLater
from agentpool.models import AgentResult, AgentTask, ErrorInfo, TenantPolicy, ToolCallSummary, Usage
from agentpool.protocol import Dispatch, Paused, RunFailed, ToolCall, ToolOutcome, pack, unpack, unpack_outcomes


def make_error(cls: type[AgentPoolError]) -> AgentPoolError:
    if issubclass(cls, RetryLater):
        return cls("slow down", retry_after_s=1.5, tenant="acme")
    if cls is ProviderError:
        return cls("overloaded", status_code=529, error_type="overloaded_error", retryable=True)
    if cls.__name__ == "ToolError":
        return cls("bad", tool="calc", kind="timeout")
    if cls is InvalidTaskInput:
        problem = {"index": 1, "loc": ["prompt"], "msg": "String should have at most 5 characters", "type": "x"}
        return InvalidTaskInput.of("1 of 2 tasks are invalid", [problem])
    return cls("something", tenant="acme")


@pytest.mark.parametrize("cls", ALL_ERRORS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("dumps", [pickle.dumps, ray.cloudpickle.dumps], ids=["pickle", "cloudpickle"])
def test_errors_round_trip(cls: type[AgentPoolError], dumps) -> None:  # type: ignore[no-untyped-def]
    err = make_error(cls)
    back = pickle.loads(dumps(err))
    assert type(back) is cls and str(back) == str(err) and back.fields == err.fields
    assert back.retryable == err.retryable
    for key, value in err.fields.items():
        assert getattr(back, key) == value


TASK = AgentTask(tenant="acme", prompt="hi", tools=["calculator"], output_schema={"type": "object"})
MODELS = [
    TASK,
    AgentResult(
        task_id="t",
        tenant="acme",
        status="rejected",
        retry_after_s=2.0,
        error=ErrorInfo(type="Overloaded", message="full", retryable=True),
        usage=Usage(input_tokens=3, cost_usd=0.1),
        tool_calls=[ToolCallSummary(tool_use_id="x", name="calc", ok=False, error_kind="timeout")],
    ),
    TenantPolicy(max_concurrency=3, allowed_tools=["calculator"]),
    PoolConfig(tool_modules=["x.y"], anthropic_api_key="sk-secret"),
    Dispatch(task=TASK, trace_id="a" * 32, traceparent="00-" + "a" * 32 + "-" + "b" * 16 + "-01", admitted_at_unix=1.0),
    ToolCall(task_id="t", tenant="acme", tool_use_id="u", name="calc", arguments={"a": 1}),
    ToolOutcome(tool_use_id="u", name="calc", content="3"),
]


@pytest.mark.parametrize("model", MODELS, ids=lambda m: type(m).__name__)
def test_models_round_trip(model) -> None:  # type: ignore[no-untyped-def]
    back = pickle.loads(ray.cloudpickle.dumps(model))
    assert back == model


def test_packed_messages_come_back_as_they_were_and_only_as_the_kind_expected() -> None:
    dispatch = next(m for m in MODELS if isinstance(m, Dispatch))
    assert unpack(pack(dispatch), Dispatch) == dispatch
    with pytest.raises(TypeError, match="held AgentTask where Dispatch was expected"):
        unpack(pack(TASK), Dispatch)
    result = next(m for m in MODELS if isinstance(m, AgentResult))
    paused = Paused(
        task_id="t", tenant="acme", tool_use_ids=["u"], tools=["calc"], requested_unix=1.0, deadline_unix=5.0
    )
    outcomes = [(0, result), (2, paused), (1, RunFailed("ValueError", "a bug"))]
    assert unpack_outcomes(pack(outcomes)) == outcomes
    for wrong in ([(0, TASK)], [result], (0, result), [(0, result, 1)]):
        with pytest.raises(TypeError):
            unpack_outcomes(pack(wrong))


def test_api_key_is_not_in_the_repr_of_the_config() -> None:
    config = PoolConfig(anthropic_api_key="sk-ant-very-secret")
    assert "very-secret" not in repr(config) and "very-secret" not in config.model_dump_json()
