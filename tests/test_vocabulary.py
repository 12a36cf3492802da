"""The vocabulary's members keep the names records, events and metrics always had, and its
properties say what the code used to spell as string sets (tables written out here)."""

from __future__ import annotations

import json

import pytest

from agentpool import events
from agentpool.events import EVENTS
from agentpool.models import AgentResult, ErrorInfo, ToolCallSummary
from agentpool.protocol import ToolCall, ToolOutcome
from agentpool.vocabulary import ErrorReason, EventType, TaskStatus, ToolErrorKind, ToolSource, tally_ran

# kind: (ran, breaker failure, process returned)
TOOL_KINDS = {
    "invalid_arguments": (False, False, False),
    "unknown_tool": (False, False, False),
    "not_allowed": (False, False, False),
    "denied": (False, False, False),
    "timeout": (True, True, True),
    "error": (True, True, True),
    "crashed": (True, True, False),
    "restarting": (False, True, False),
    "bulkhead_full": (False, False, False),
    "breaker_open": (False, False, False),
    "outcome_unknown": (False, False, False),
    "unavailable": (False, False, False),
    "injection": (True, False, True),
}
# status: (ran, counts as an error, a run that fell short)
STATUSES = {
    "succeeded": (True, False, False),
    "failed": (True, True, True),
    "rejected": (False, False, False),
    "timed_out": (True, True, True),
    "iteration_cap": (True, False, True),
    "budget_exhausted": (True, False, True),
    "cancelled": (False, False, False),
}


@pytest.mark.parametrize("name", sorted(TOOL_KINDS))
def test_tool_error_kinds(name: str) -> None:
    kind = ToolErrorKind(name)
    assert (kind.ran, kind.is_failure, kind.returned) == TOOL_KINDS[name]
    assert ToolErrorKind.of(name) is kind


def test_every_tool_error_kind_and_status_is_in_the_tables() -> None:
    assert {k.value for k in ToolErrorKind} == set(TOOL_KINDS)
    assert {s.value for s in TaskStatus} == set(STATUSES)


def test_a_kind_the_pool_does_not_know_is_an_error() -> None:
    assert ToolErrorKind.of("quota_hit") is ToolErrorKind.ERROR


@pytest.mark.parametrize("name", sorted(STATUSES))
def test_statuses(name: str) -> None:
    status = TaskStatus(name)
    assert (status.ran, status.is_error, status.fell_short) == STATUSES[name]


def test_tallies_count_served_calls_and_runs() -> None:
    assert all(tally_ran(t) for t in ("ok", "cached", "replayed"))
    assert [k.value for k in ToolErrorKind if tally_ran(k)] == ["timeout", "error", "crashed", "injection"]


def test_members_are_their_strings_in_records_and_json() -> None:
    result = AgentResult(
        task_id="t1",
        tenant="acme",
        status=TaskStatus.REJECTED,
        error=ErrorInfo(type="Overloaded", message="busy", reason=ErrorReason.QUEUE_FULL),
        tool_calls=[ToolCallSummary(tool_use_id="u", name="calc", ok=False, error_kind=ToolErrorKind.TIMEOUT)],
    )
    stored = json.loads(result.model_dump_json())
    assert stored["status"] == "rejected" and stored["error"]["reason"] == "queue_full"
    assert stored["tool_calls"][0]["error_kind"] == "timeout"
    back = AgentResult.model_validate_json(result.model_dump_json())
    assert back.status is TaskStatus.REJECTED and back.status == "rejected"
    assert back.error is not None and back.error.reason is ErrorReason.QUEUE_FULL
    assert json.dumps({"event": EventType.TASK_END}) == '{"event": "task_end"}'
    assert f"{TaskStatus.TIMED_OUT}" == "timed_out"


def test_a_tool_outcome_names_how_it_ended() -> None:
    call = ToolCall(task_id="t", tenant="acme", tool_use_id="u", name="calc")
    assert ToolOutcome.failure(call, ToolErrorKind.BULKHEAD_FULL, "busy").kind == "bulkhead_full"
    ok = ToolOutcome(tool_use_id="u", name="calc", content="4")
    assert ok.kind == "ok"
    assert ok.model_copy(update={"source": ToolSource.RECORD}).kind == "record"
    with pytest.raises(ValueError):
        ErrorReason("slow")


def test_every_event_type_has_one_model_and_data_keeps_set_fields_only() -> None:
    assert set(EVENTS) == set(EventType)
    ended = events.TaskEnd(status=TaskStatus.CANCELLED)
    assert ended.data() == {"status": "cancelled"}
    breaker = events.BreakerState.model_validate(
        {"tool": "t", "from": "closed", "to": "open", "calls": 4, "failure_rate": 0.5, "slow_rate": 0.0}
        | {"calls_ran_so_far": 4, "unix_ts": 1.5}
    )
    assert breaker.data()["from"] == "closed" and "from_state" not in breaker.data()
    result = events.ToolResult(
        iteration=1, tool="t", tool_use_id="u", ok=False, error_kind=ToolErrorKind.TIMEOUT, duration_ms=2.0
    )
    assert json.dumps(result.data())  # JSON types only
    with pytest.raises(ValueError):
        events.TaskAdmitted(priority="standard", queued=1, adopted=False, surprise=True)  # type: ignore[call-arg]
