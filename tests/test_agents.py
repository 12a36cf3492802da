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


def test_what_the_catalog_says_when_it_finds_nothing() -> None:
    catalog = AgentCatalog.empty()
    with pytest.raises(UnknownAgent) as none:
        catalog.find("support")
    assert none.value.message == "no agent 'support' is registered (registered: none)"
    one = version("support", SPEC, "v1")
    two = version("support", SPEC.model_copy(update={"max_tokens": 7}), "v2")
    catalog.add(one)
    catalog.add(two)
    catalog.add(version("billing", SPEC, None))
    with pytest.raises(UnknownAgent) as other:
        catalog.find("other")
    assert other.value.message == "no agent 'other' is registered (registered: billing, support)"
    assert other.value.fields == {"agent": "other", "reason": ErrorReason.UNKNOWN_AGENT}
    with pytest.raises(UnknownAgent) as label:
        catalog.find("support@v9")
    assert label.value.message == "agent 'support' has no label 'v9' (labels: v1, v2)"
    with pytest.raises(UnknownAgent) as unlabelled:
        catalog.find("billing@v1")
    assert unlabelled.value.message == "agent 'billing' has no label 'v1' (labels: none)"
    with pytest.raises(UnknownAgent) as missing:
        catalog.find("support@sha:ffffff")
    assert missing.value.message == "agent 'support' has no version whose hash starts 'ffffff'"
    common = min(len(one.sha), len(two.sha))
    shared = next(i for i in range(common) if one.sha[i] != two.sha[i])
    if shared >= 6:  # the two hashes share a 6-digit prefix: it names both
        with pytest.raises(UnknownAgent, match="has 2 versions whose hash starts"):
            catalog.find(f"support@sha:{one.sha[:6]}")
    bad = "x" * 200
    with pytest.raises(UnknownAgent) as parsed:
        AgentRef.parse(bad)
    assert parsed.value.message == f"{bad!r} is not an agent reference: name, name@label or name@sha:<hex>"
    assert parsed.value.fields["agent"] == "x" * 140


def test_history_is_by_registration_then_hash() -> None:
    catalog = AgentCatalog.empty()
    late, early = version("a", SPEC, "v2", 5.0), version("a", SPEC.model_copy(update={"max_tokens": 9}), "v1", 1.0)
    same = version("a", SPEC.model_copy(update={"max_tokens": 11}), "v3", 5.0)
    for v in (late, same, early):
        catalog.add(v)
    assert catalog.history("a") == [early, *sorted([late, same], key=lambda v: v.sha)]
    assert catalog.history("nobody") == []


def test_the_caps_and_lists_a_task_takes() -> None:
    spec = SPEC.model_copy(update={"max_cost_usd": 0.5, "fallback_models": ["claude-haiku-4-5"]})
    v = version("support", spec, "v1")
    cheap = apply_spec(AgentTask(tenant="a", prompt="p", agent="support", max_cost_usd=0.9), v)
    assert cheap.max_cost_usd == 0.5  # a task's cap above the spec's does not raise it
    free = apply_spec(AgentTask(tenant="a", prompt="p", agent="support", max_cost_usd=0.3), version("s", SPEC, "v1"))
    assert free.max_cost_usd == 0.3 and free.fallback_models is None
    assert cheap.fallback_models == ["claude-haiku-4-5"] and cheap.fallback_models is not spec.fallback_models
    assert cheap.tools == ["calculator"] and cheap.tools is not spec.tools
    assert (cheap.agent, cheap.agent_version) == ("support", v.tag)
    assert set(cheap.model_dump()) == set(AgentTask.model_fields)  # no stray fields


def test_a_canonical_form_keeps_text_as_it_is() -> None:
    spec = AgentSpec(system="Réponds en français — 日本語 too.", metadata={"b": 1, "a": 2.5})
    assert '"system":"Réponds en français — 日本語 too."' in spec.canonical()
    assert spec.canonical().index('"a":2.5') < spec.canonical().index('"b":1')


def test_a_diff_is_exact() -> None:
    old = version("s", AgentSpec(max_tokens=10), "v1")
    new = version("s", AgentSpec(max_tokens=20), "v2")
    assert spec_diff(old, new) == (
        "--- s@v1\n+++ s@v2\n@@ -2,7 +2,7 @@\n"
        '   "fallback_models": null,\n   "max_cost_usd": null,\n   "max_iterations": 10,\n'
        '-  "max_tokens": 10,\n+  "max_tokens": 20,\n'
        '   "metadata": {},\n   "model": null,\n   "output_schema": null,\n'
    )
