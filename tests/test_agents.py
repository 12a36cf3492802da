"""Versioned agent specs, pure: a version's identity, references, the catalog's lookups, how a
task takes its agent's fields, and the diff."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agentpool.agents import AgentCatalog, AgentRef, AgentSpec, AgentVersion, apply_spec, spec_diff
from agentpool.errors import InvalidTaskInput, UnknownAgent
from agentpool.models import AgentTask, agent_fields
from agentpool.vocabulary import ErrorReason, Variant


def version(name: str, spec: AgentSpec, label: str | None, at: float = 1.0) -> AgentVersion:
    return AgentVersion(name=name, sha=spec.digest(), label=label, created_unix=at, spec=spec)


SPEC = AgentSpec(system="You answer support questions.", model="claude-sonnet-4-5", tools=["calculator"])


def test_a_versions_hash_is_pinned() -> None:
    # A rolling upgrade must name the same spec by the same hash: the canonical form is a contract.
    assert SPEC.digest() == "109d9326fd0c01afbf1061447a8df40e58def4c3d0e0dc86a796c1916528b905"
    assert SPEC.canonical() == (
        '{"fallback_models":null,"max_cost_usd":null,"max_iterations":10,"max_tokens":1024,"metadata":{},'
        '"model":"claude-sonnet-4-5","output_schema":null,"system":"You answer support questions.","tier":null,'
        '"timeout_s":120.0,"token_budget":null,"tools":["calculator"]}'
    )
    assert AgentSpec.model_validate_json(SPEC.model_dump_json()).digest() == SPEC.digest()


@given(st.text(max_size=50), st.integers(1, 4000))
def test_equal_specs_share_a_hash_and_any_change_makes_a_new_one(system: str, max_tokens: int) -> None:
    one = AgentSpec(system=system or None, max_tokens=max_tokens)
    assert one.digest() == AgentSpec(system=system or None, max_tokens=max_tokens).digest()
    assert one.digest() != AgentSpec(system=(system or "") + "!", max_tokens=max_tokens).digest()
    assert one.digest() != AgentSpec(system=system or None, max_tokens=max_tokens % 4000 + 1).digest()


def test_a_spec_is_held_to_a_tasks_bounds() -> None:
    with pytest.raises(InvalidTaskInput):
        AgentSpec(output_schema={"type": "nonsense"})
    with pytest.raises(InvalidTaskInput):
        AgentSpec(max_tokens=0)


@pytest.mark.parametrize(
    ("text", "name", "label", "sha"),
    [
        ("support", "support", None, None),
        ("support@v3", "support", "v3", None),
        ("a-b@sha:1f2e3d", "a-b", None, "1f2e3d"),
    ],
)
def test_references_parse(text: str, name: str, label: str | None, sha: str | None) -> None:
    ref = AgentRef.parse(text)
    assert (ref.name, ref.label, ref.sha) == (name, label, sha)
    assert str(ref) == text
    assert ref.pinned == (label is not None or sha is not None)


@pytest.mark.parametrize("text", ["", "@v1", "support@", "support@sha:12", "sup port", "support@sha:XYZXYZ"])
def test_bad_references_are_refused_with_a_reason(text: str) -> None:
    with pytest.raises(UnknownAgent) as raised:
        AgentRef.parse(text)
    assert raised.value.fields["reason"] == ErrorReason.UNKNOWN_AGENT


def test_the_catalog_finds_versions_by_name_label_and_hash() -> None:
    catalog = AgentCatalog.empty()
    v1 = version("support", SPEC, "v1", 1.0)
    v2 = version("support", SPEC.model_copy(update={"max_tokens": 2048}), "v2", 2.0)
    catalog.add(v1)
    catalog.add(v2)
    assert catalog.find("support") == v1  # the first version is current until told otherwise
    assert catalog.find("support@v2") == v2
    assert catalog.find(f"support@sha:{v2.sha[:8]}") == v2
    catalog.add(v2, current=True)
    assert catalog.find("support") == v2
    assert [v.label for v in catalog.history("support")] == ["v1", "v2"]
    for missing in ("other", "support@v9", "support@sha:000000"):
        with pytest.raises(UnknownAgent):
            catalog.find(missing)


def test_a_task_takes_its_agents_fields_and_says_which_version() -> None:
    v1 = version("support", SPEC.model_copy(update={"max_cost_usd": 0.5}), "v1")
    task = AgentTask(tenant="acme", prompt="hi", agent="support", max_cost_usd=0.2, metadata={"user_id": "u1"})
    resolved = apply_spec(task, v1, variant=Variant.CANARY)
    assert (resolved.system, resolved.model, resolved.tools) == (SPEC.system, SPEC.model, ["calculator"])
    assert resolved.max_cost_usd == 0.2  # the task's own cap may only lower the spec's
    assert (resolved.agent, resolved.agent_version, resolved.variant) == ("support", v1.tag, Variant.CANARY)
    assert v1.tag == f"v1+{v1.sha[:12]}"
    # It stays valid when checked again (re-delivered from the backlog, say).
    assert AgentTask.model_validate(resolved.model_dump()) == resolved
    assert agent_fields(resolved) == {"agent": "support", "agent_version": v1.tag, "variant": Variant.CANARY}
    assert agent_fields(AgentTask(tenant="acme", prompt="hi")) == {}


@pytest.mark.parametrize(
    "spelled", [{"system": "x"}, {"model": "claude-haiku-4-5"}, {"tools": ["calculator"]}, {"max_tokens": 10}]
)
def test_a_task_that_names_an_agent_cannot_spell_the_specs_fields(spelled: dict[str, object]) -> None:
    with pytest.raises(InvalidTaskInput, match="from the agent's spec"):
        AgentTask(tenant="acme", prompt="hi", agent="support", **spelled)  # type: ignore[arg-type]


def test_two_versions_diff_line_by_line() -> None:
    v1 = version("support", SPEC, "v1")
    v2 = version("support", SPEC.model_copy(update={"system": "Be brief."}), "v2")
    text = spec_diff(v1, v2)
    assert text.startswith("--- support@v1\n+++ support@v2\n")
    assert '-  "system": "You answer support questions.",' in text and '+  "system": "Be brief.",' in text
    assert spec_diff(v1, v1) == ""
